"""The README's Python examples run as written, and its flag table is the one the options
declare."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from plrd.cli.parser import flag_table

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_python_examples():
    assert EXAMPLES


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    from tests.tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "path" / "to" / "model")  # the examples' model
    monkeypatch.chdir(tmp_path)
    exec(compile(EXAMPLES[index], f"README.md example {index + 1}", "exec"), {})


def test_readme_flag_table_is_generated_from_the_options():
    assert flag_table("family") in README, (
        "regenerate it: python -c 'from plrd.cli.parser import flag_table; print(flag_table())'"
    )


ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(set(re.findall(r"`((?:tests|benchmarks|docs|plrd|plrd_kernels)/[\w./-]+)`", README)))


@pytest.mark.parametrize("path", FILES)
def test_every_file_the_readme_names_exists(path):
    assert (ROOT / path).exists(), f"README.md names {path}, which is not in the repository"
