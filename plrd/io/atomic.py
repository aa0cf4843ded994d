"""Crash-safe file writes: write to a temporary sibling, then rename over the target.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
half-written file. ``os.replace`` is atomic on POSIX when source and target share a directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from plrd.errors import ConfigError, DamagedFileError, InputError


def _current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, directory: bool = False) -> None:
    """Give a ``tempfile`` file (created 0600) or directory (0700) the mode a plain ``open`` or
    ``mkdir`` would have given it, so what plrd writes is as readable as any other file."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_current_umask())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success rename it to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _follow_umask(tmp)  # after the writer: some writers replace the file they are given
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; DamagedFileError naming the file when it is not UTF-8 JSON
    (a missing file raises FileNotFoundError)."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DamagedFileError(
                f"{path}: cannot be read as JSON ({err}): the file is damaged; restore it or "
                "write it again"
            ) from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    An existing ``path`` is moved aside first and removed after the rename, so at every moment
    ``path`` is either absent, the old directory, or the complete new one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    _follow_umask(tmp, directory=True)
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
            )
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete leftovers (``.name.*.tmp`` / ``.old``) of writes interrupted in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        return
    for entry in d.iterdir():
        if entry.name.startswith(".") and entry.name.endswith((".tmp", ".old")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _refuse(option: str | None, problem: str) -> InputError:
    return InputError(problem) if option is None else ConfigError(option, problem)


def check_writable_dir(path: str | os.PathLike, option: str | None = None) -> None:
    """Raise InputError unless ``path`` is (or can be created as) a directory we can write into.

    ``option``, when given, names the setting that holds ``path``: the error is then a
    ``ConfigError`` for it. Tries it for real: creates the missing directories and a temporary
    file in the deepest one, then removes what it created, so a check that passes leaves the
    file system as it was. (A permission test alone is not enough: root passes every
    ``os.access`` test.)
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise _refuse(option, f"{path} exists and is not a directory; pass a directory path")
    missing = []
    p = target
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, name = tempfile.mkstemp(prefix=".plrd-write-test.", dir=target)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise _refuse(
            option,
            f"{path} is not writable ({reason}: {err.filename or path}); choose a directory "
            "you can write to",
        ) from None
    finally:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
