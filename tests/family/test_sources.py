"""Documents from any text a user names: files whatever their name, tables and saved datasets
through Hugging Face datasets, a chosen text column, binary files refused, big inputs read only
as far as needed."""

from __future__ import annotations

import json

import pytest

from plrd.errors import InputError
from plrd.family.sources import load_documents

TEXTS = [f"Document {i}: {'some words about plrd ' * (5 + i)}" for i in range(6)]


def test_a_named_file_is_text_whatever_its_name(tmp_path):
    for name in ("LICENSE", "notes", "corpus.text", "data.log"):
        (tmp_path / name).write_text("First paragraph.\n\nSecond paragraph.")
        assert load_documents([str(tmp_path / name)]) == ["First paragraph.\n\nSecond paragraph."]


def test_a_binary_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match="blob is not UTF-8 text") as err:
        load_documents([str(tmp_path / "blob")])
    assert "\n" not in str(err.value)


def test_folders_still_choose_files_by_suffix(tmp_path):
    (tmp_path / "a.txt").write_text("kept")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01")
    (tmp_path / "README").write_text("not chosen: no known suffix")
    assert load_documents([str(tmp_path)]) == ["kept"]


@pytest.fixture
def tables(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"body": TEXTS, "id": list(range(len(TEXTS)))})
    rows.to_parquet(str(tmp_path / "t.parquet"))
    rows.to_csv(str(tmp_path / "t.csv"), index=False)
    rows.to_json(str(tmp_path / "t.json"))  # JSON lines, as datasets writes it
    with open(tmp_path / "t.jsonl", "w") as f:
        for text in TEXTS:
            f.write(json.dumps({"body": text}) + "\n")
    rows.save_to_disk(str(tmp_path / "saved"))
    return tmp_path


@pytest.mark.parametrize("name", ["t.parquet", "t.csv", "t.json", "t.jsonl", "saved"])
def test_tables_and_saved_datasets_by_text_column(tables, name):
    assert load_documents([str(tables / name)], text_column="body") == TEXTS


def test_a_missing_text_column_names_the_columns(tables):
    with pytest.raises(InputError, match=r"no column 'text' \(columns: body, id\)"):
        load_documents([str(tables / "t.parquet")])


def test_a_big_input_is_read_only_as_far_as_needed(tables):
    first_two = sum(len(t) for t in TEXTS[:2])
    docs = load_documents([str(tables / "t.parquet")], text_column="body", max_chars=first_two)
    assert docs == TEXTS[:2]
