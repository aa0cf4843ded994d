"""family.json: the record of a family — the recipe it was built with, its corpus, the parent's
figures and one entry per finished member (sorted by size, largest first).

A member is finished once its entry is in family.json; the entry is written last, after the
member directory is complete, and holds the SHA-256 of the member's weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plrd.errors import DamagedFileError, InputError
from plrd.family.config import FamilyConfig
from plrd.family.data import Corpus
from plrd.family.run_data import KEYWORDS
from plrd.io.atomic import read_json, write_json
from plrd.io.members import verify_member

FAMILY_FILE = "family.json"
PLOT_FILE = "family.png"
FORMAT_VERSION = 1


def size_key(size: float) -> str:
    """Directory name of the member of ``size``: ``size-0.90``."""
    text = f"{size:.4f}".rstrip("0")
    if len(text.split(".")[1]) < 2:
        text = f"{size:.2f}"
    return f"size-{text}"


def member_path(size: float) -> str:
    """A member's directory relative to the family: ``members/size-0.90``."""
    return f"members/{size_key(size)}"


def corpus_info(corpus: Corpus, data: Sequence[str], eval_tokens: int, calib_tokens: int) -> dict:
    return {
        "data": [p if p in KEYWORDS else os.path.abspath(os.path.expanduser(p)) for p in data],
        "fingerprint": corpus.fingerprint,
        "block_size": corpus.block_size,
        "train_documents": corpus.train_docs,
        "train_tokens": corpus.train_tokens,
        "held_out_documents": corpus.held_out_docs,
        "held_out_tokens": corpus.held_out_tokens,
        "eval_tokens": eval_tokens,
        "calibration_tokens": calib_tokens,
    }


def new_record(
    cfg: FamilyConfig, corpus: dict, parent: dict, throughput: str, evaluation: dict
) -> dict:
    """A family with no member yet."""
    return {
        "format": FORMAT_VERSION,
        "config": cfg.recipe() | {"sizes": list(cfg.sizes)},
        "corpus": corpus,
        "throughput": throughput,
        "evaluation": evaluation,
        "parent": parent,
        "members": [],
    }


def read_record(out: Path) -> dict | None:
    path = Path(out) / FAMILY_FILE
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError as err:  # JSONDecodeError
        raise DamagedFileError(
            f"{path}: not valid JSON ({err}); restore it or pass a new out"
        ) from None


def write_record(out: Path, record: dict) -> None:
    write_json(Path(out) / FAMILY_FILE, record)


def add_member(record: dict, entry: dict) -> None:
    """Put ``entry`` into the record's members (replacing one of the same size), by size."""
    members = [m for m in record["members"] if m["size"] != entry["size"]] + [entry]
    record["members"] = sorted(members, key=lambda m: -m["size"])


def check_recipe(record: dict, cfg: FamilyConfig) -> None:
    """Refuse to continue a family built with another recipe or other first sizes."""
    old = record.get("config", {})
    new = cfg.recipe()
    diff = [k for k in new if k in old and k != "data" and old[k] != new[k]]
    if diff:
        raise InputError(
            f"{cfg.out} holds a family built with other settings ({', '.join(diff)}); "
            "rerun with the same settings to resume, or choose a new output directory"
        )
    done = [m["size"] for m in record.get("members", [])]
    if list(cfg.sizes[: len(done)]) != done:
        raise InputError(
            f"{cfg.out} already holds members of sizes {','.join(f'{s:g}' for s in done)}; "
            "the sizes must start with them to resume, or choose a new output directory"
        )


def check_corpus(record: dict, cfg: FamilyConfig, fingerprint: str) -> None:
    """Refuse to continue a family whose training text changed (its fingerprint differs)."""
    if record.get("corpus", {}).get("fingerprint") != fingerprint:
        raise InputError(
            f"{cfg.out} holds a family built with other settings (data (the corpus text "
            "changed)); rerun with the same data to resume, or choose a new output directory"
        )


def verify_members(root: Path, record: dict) -> None:
    """Verify every finished member of the family; ``DamagedFileError`` naming the first bad
    one (and how many more there are)."""
    problems = []
    for m in record.get("members", []):
        try:
            verify_member(Path(root) / m["path"], m.get("sha256"))
        except DamagedFileError as err:
            problems.append(f"{m['path']}: {err}")
    if problems:
        more = f" (and {len(problems) - 1} more damaged member(s))" if len(problems) > 1 else ""
        raise DamagedFileError(
            f"{problems[0]}{more}; run the same `plrd family` command again to rebuild "
            "damaged members"
        )


def parent_entry(
    name: str, params: int, ppl: float, tokens_per_s: float, general_ppl: float
) -> dict[str, Any]:
    return {
        "name": name,
        "params": params,
        "held_out_ppl": ppl,
        "general_ppl": general_ppl,
        "kl_to_parent": 0.0,
        "tokens_per_s": tokens_per_s,
    }
