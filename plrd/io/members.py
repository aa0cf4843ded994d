"""Members on disk: save, verify, load (interim: the io clean-up replaces this module)."""

from __future__ import annotations

from pathlib import Path

from plrd.errors import DamagedFileError
from plrd.io.checkpoint import verify_checkpoint, weights_checksum
from plrd.io.models import is_member_dir, load_pretrained, save_member

__all__ = ["is_member_dir", "load_pretrained", "save_member", "verify_member"]


def verify_member(member_dir: str | Path, sha256: str | None = None) -> str:
    """The SHA-256 of the member's weights when its files check out (against its plrd.json and,
    when given, the digest ``sha256`` recorded elsewhere); ``DamagedFileError`` otherwise."""
    try:
        info = verify_checkpoint(member_dir, sha256=sha256)
        return (info.get("weights") or {}).get("sha256") or weights_checksum(member_dir)
    except ValueError as err:
        raise DamagedFileError(str(err).splitlines()[0]) from None
