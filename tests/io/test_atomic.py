"""Atomic writes: an interrupted write leaves the old file (or directory) whole and nothing else.

A write is interrupted three ways here: an exception in the writer, a KeyboardInterrupt (what
Ctrl-C or a stopped job raises) midway, and a real kill of the process (``os._exit``), after
which ``remove_stale_temporaries`` clears what the dead writer left.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plrd.errors import ConfigError, DamagedFileError, InputError
from plrd.io import atomic
from plrd.io.atomic import (
    atomic_dir,
    atomic_path,
    check_writable_dir,
    read_json,
    remove_stale_temporaries,
    write_json,
    write_text,
)

INTERRUPTIONS = [RuntimeError, KeyboardInterrupt]


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def old_file(tmp_path) -> Path:
    target = tmp_path / "notes.txt"
    target.write_text("old content\n")
    return target


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
def test_atomic_path_interrupted_keeps_the_old_file(old_file, interruption):
    with pytest.raises(interruption):
        with atomic_path(old_file) as tmp:
            assert tmp != old_file and tmp.parent == old_file.parent
            with open(tmp, "w") as f:
                f.write("half of the new cont")
                f.flush()
                raise interruption("stopped midway")
    assert old_file.read_text() == "old content\n"
    assert _entries(old_file.parent) == ["notes.txt"]  # the temporary is gone


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
def test_write_text_interrupted_before_the_rename_keeps_the_old_file(
    old_file, monkeypatch, interruption
):
    def stopped(fd):  # the new text is written; the process stops before it is in place
        raise interruption("stopped midway")

    monkeypatch.setattr(atomic.os, "fsync", stopped)
    with pytest.raises(interruption):
        write_text(old_file, "new content\n")
    assert old_file.read_text() == "old content\n"
    assert _entries(old_file.parent) == ["notes.txt"]


def test_write_text_and_json_replace_the_file(old_file):
    write_text(old_file, "new content\n")
    assert old_file.read_text() == "new content\n"
    write_json(old_file.parent / "doc.json", {"a": [1, 2]})
    assert read_json(old_file.parent / "doc.json") == {"a": [1, 2]}
    assert _entries(old_file.parent) == ["doc.json", "notes.txt"]


def test_a_killed_writer_leaves_the_old_file_and_a_temporary_that_is_cleared(old_file):
    script = (
        "import os, sys\n"
        "from plrd.io.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('new content, never finished')\n"
        "    os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(old_file)], timeout=120)
    assert done.returncode == 9
    assert old_file.read_text() == "old content\n"
    leftovers = [n for n in _entries(old_file.parent) if n != "notes.txt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".notes.txt.")
    remove_stale_temporaries(old_file.parent)
    assert _entries(old_file.parent) == ["notes.txt"]


@pytest.fixture
def old_dir(tmp_path) -> Path:
    target = tmp_path / "member"
    target.mkdir()
    (target / "a.txt").write_text("old a\n")
    (target / "b.txt").write_text("old b\n")
    return target


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
def test_atomic_dir_interrupted_keeps_the_old_directory(old_dir, interruption):
    with pytest.raises(interruption):
        with atomic_dir(old_dir) as tmp:
            assert tmp != old_dir and tmp.parent == old_dir.parent
            (tmp / "a.txt").write_text("new a\n")
            raise interruption("stopped midway")
    assert _entries(old_dir) == ["a.txt", "b.txt"]
    assert (old_dir / "a.txt").read_text() == "old a\n"
    assert _entries(old_dir.parent) == ["member"]


def test_atomic_dir_replaces_the_directory_whole(old_dir):
    with atomic_dir(old_dir) as tmp:
        (tmp / "c.txt").write_text("new c\n")
    assert _entries(old_dir) == ["c.txt"]  # nothing of the old directory survives in it
    assert _entries(old_dir.parent) == ["member"]


def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "g.txt").write_text("y")
    finally:
        os.umask(previous)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


def test_damaged_json_names_the_file(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text("{ not json")
    with pytest.raises(DamagedFileError, match=r"doc\.json: cannot be read as JSON"):
        read_json(path)


def test_unwritable_directory_names_the_path_and_the_option(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="exists and is not a directory") as err:
        check_writable_dir(blocker)
    assert not isinstance(err.value, ConfigError)
    with pytest.raises(ConfigError, match=r"^out: .*a-file/deeper is not writable") as err:
        check_writable_dir(blocker / "deeper", option="out")
    assert err.value.option == "out" and "\n" not in str(err.value)
    nested = tmp_path / "new" / "deeper"
    check_writable_dir(nested)
    assert not (tmp_path / "new").exists()  # the check leaves nothing behind
