"""Files plrd writes follow the umask like any other program's (not private 0600 temporaries)."""

from __future__ import annotations

import os
import stat

import plrd
from plrd.family.schedule import build_family
from tests.tiny_models import tiny_llama


def _modes(root):
    for path in [root, *root.rglob("*")]:
        yield path, stat.S_IMODE(path.stat().st_mode)


def test_everything_written_is_readable_by_group_and_others_under_umask_022(make_config, tmp_path):
    old = os.umask(0o022)
    try:
        cfg = make_config(sizes=(0.9,), checkpoint_every=1)
        build_family(cfg, say=lambda _msg: None)
        plrd.save(tiny_llama(), tmp_path / "saved")
    finally:
        os.umask(old)
    written = list(_modes(tmp_path / "family")) + list(_modes(tmp_path / "saved"))
    names = {p.name for p, _ in written}
    assert {"family.json", "model.safetensors", "plrd.json", "stage.json"} <= names
    for path, mode in written:
        wanted = 0o755 if path.is_dir() else 0o644
        assert mode & wanted == wanted, f"{path}: {oct(mode)}"
