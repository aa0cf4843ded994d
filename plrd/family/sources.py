"""Where a corpus's documents come from: files, folders, glob patterns, tables, datasets.

- A file named explicitly is read whatever its name: ``.parquet``, ``.arrow``, ``.csv`` and
  ``.json`` through Hugging Face ``datasets`` (one document per row's ``text_column``),
  ``.jsonl`` one JSON object per line (its ``text_column``), anything else as UTF-8 text cut
  into paragraph groups of about ``doc_chars`` characters. A file that is not text (NUL bytes,
  not UTF-8) is refused, naming it.
- A folder written by ``datasets.Dataset.save_to_disk`` is read as that dataset; any other
  folder is searched recursively for files with a known suffix (``.txt``, ``.md`` and the
  table suffixes above), as are glob patterns.
- No paths: Python's ``pydoc_data.topics`` help pages (what ``--data pydoc`` names).

Documents are yielded one at a time and tables are streamed, so a corpus larger than memory is
read only as far as the caller takes it (``load_documents(..., max_chars=...)``).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from plrd.errors import InputError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
TABLE_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + tuple(TABLE_FORMATS)
DATASET_MARKERS = ("dataset_info.json", "state.json")  # what save_to_disk writes
DEFAULT_DOC_CHARS = 4000
DEFAULT_TEXT_COLUMN = "text"


def default_documents() -> list[str]:
    """Python's ``pydoc_data.topics`` help pages, one document per topic (``--data pydoc``)."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics) if topics[key].strip()]


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and all((path / m).is_file() for m in DATASET_MARKERS)


def _known(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def expand_paths(paths: Sequence[str]) -> list[Path]:
    """What ``paths`` name, in order, each once: files (any name), saved datasets (folders),
    and the known-suffix files found in other folders (recursively) and glob patterns.

    Raises ``InputError`` naming the first path that does not exist or matches nothing.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if any(ch in raw for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(raw), recursive=True))
            hits = [Path(m) for m in matches if _known(Path(m)) or is_saved_dataset(Path(m))]
            if not hits:
                raise InputError(
                    f"data pattern {raw} matches no {'/'.join(SUFFIXES)} file; check the pattern"
                )
            found.extend(hits)
        elif is_saved_dataset(path) or path.is_file():
            found.append(path)
        elif path.is_dir():
            hits = sorted(p for p in path.rglob("*") if _known(p))
            if not hits:
                raise InputError(f"data folder {raw} holds no {'/'.join(SUFFIXES)} file")
            found.extend(hits)
        else:
            raise InputError(f"data path {raw} does not exist")
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def split_paragraphs(text: str, doc_chars: int = DEFAULT_DOC_CHARS) -> list[str]:
    """Cut ``text`` at blank lines into consecutive pieces of at least ``doc_chars`` characters.

    The last piece takes any remainder shorter than ``doc_chars``; empty text gives no piece.
    """
    paragraphs = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for p in paragraphs:
        current.append(p)
        size += len(p) + 2
        if size >= doc_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        if docs and size < doc_chars // 2:
            docs[-1] = docs[-1] + "\n\n" + "\n\n".join(current)
        else:
            docs.append("\n\n".join(current))
    return docs


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; ``InputError`` naming it when it is not text."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"data file {path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it "
            "to UTF-8 or pass a text file"
        ) from None
    except OSError as err:
        raise InputError(
            f"data file {path} cannot be read ({err.strerror or type(err).__name__}); check "
            "that it exists and that you may read it"
        ) from None
    if "\x00" in text:
        raise InputError(
            f"data file {path} is not text (it holds NUL bytes, like a binary file); pass UTF-8 "
            "text files"
        )
    return text


def _jsonl_documents(path: Path, column: str) -> Iterator[str]:
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno} is not valid JSON ({err.msg})") from None
        text = record.get(column) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise InputError(f"{path}:{lineno} has no string {column!r} field")
        if text.strip():
            yield text


def _table_rows(path: Path):
    """A streamed ``datasets`` view of a table file or a saved dataset (nothing read yet)."""
    try:
        import datasets  # heavy; an optional dependency
    except ImportError:
        raise InputError(
            f"reading {path} needs the 'datasets' package: pip install 'plrd[data]'"
        ) from None
    if is_saved_dataset(path):
        return datasets.load_from_disk(str(path))  # memory-mapped, not loaded whole
    builder = TABLE_FORMATS[path.suffix.lower()]
    return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)


def _table_documents(path: Path, column: str) -> Iterator[str]:
    try:
        rows = iter(_table_rows(path))
        first = next(rows, None)
    except InputError:
        raise
    except Exception as err:  # datasets' own errors: name the file, not their internals
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"data file {path} cannot be read as a table ({reason})") from None
    if first is not None and column not in first:
        raise InputError(
            f"data {path} has no column {column!r} (columns: {', '.join(first)}); choose "
            "the column with text_column"
        )
    if first is None:
        return
    for index, row in enumerate(itertools.chain([first], rows)):
        yield from _row_text(path, index, row, column)


def _row_text(path: Path, index: int, row: dict, column: str) -> Iterator[str]:
    text = row.get(column)
    if not isinstance(text, str):
        raise InputError(f"data {path} row {index}: {column!r} is not text ({text!r:.40})")
    if text.strip():
        yield text


def file_documents(path: Path, column: str, doc_chars: int) -> Iterator[str]:
    """The documents of one file or saved dataset (see the module docstring)."""
    suffix = path.suffix.lower()
    if is_saved_dataset(path) or suffix in TABLE_FORMATS:
        yield from _table_documents(path, column)
    elif suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(path, column)
    else:
        yield from split_paragraphs(_read_text(path), doc_chars)


def iter_documents(
    paths: Sequence[str],
    text_column: str = DEFAULT_TEXT_COLUMN,
    doc_chars: int = DEFAULT_DOC_CHARS,
) -> Iterator[str]:
    """The documents of every path, in order (checked to exist before the first is read)."""
    for path in expand_paths(paths):
        yield from file_documents(path, text_column, doc_chars)


def load_documents(
    paths: Sequence[str] | None,
    text_column: str = DEFAULT_TEXT_COLUMN,
    doc_chars: int = DEFAULT_DOC_CHARS,
    max_chars: int | None = None,
) -> list[str]:
    """Documents from ``paths`` (Python's help pages when there are none), read until they hold
    ``max_chars`` characters when that is given; ``InputError`` when there is no text."""
    if not paths:
        return default_documents()
    docs: list[str] = []
    total = 0
    for doc in iter_documents(paths, text_column, doc_chars):
        docs.append(doc)
        total += len(doc)
        if max_chars is not None and total >= max_chars:
            break
    if not docs:
        raise InputError(f"the corpus is empty: no text in {', '.join(map(str, paths))}")
    return docs
