"""``plrd eval DIR --tasks``: lm-eval scores for the parent and every member, in family.json and
the table; unknown task names refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plrd.cli.entry import main
from tests.helpers import one_line_error

pytest.importorskip("lm_eval")
ROOT = Path(__file__).resolve().parents[2]
TASKS = str(ROOT / "tests" / "tasks")


@pytest.fixture
def family(make_config, tmp_path):
    from plrd.family.schedule import build_family

    cfg = make_config(tokens_per_stage=0)
    build_family(cfg, say=lambda _m: None)
    return Path(cfg.out)


def test_task_scores_for_every_member_and_the_parent(family, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # lm-eval reads the task's data_files from the working directory
    argv = ["eval", str(family), "--tasks", "plrd_tiny_mc", "--tasks-path", TASKS]
    assert main(argv + ["--device", "cpu", "--no-progress"]) == 0
    record = json.loads((family / "family.json").read_text())
    for row in [record["parent"], *record["members"]]:
        acc = row["tasks"]["plrd_tiny_mc"]["acc"]
        assert acc in (0.0, 0.25, 0.5, 0.75, 1.0)  # four questions
    printed = capsys.readouterr().out
    assert "plrd_tiny_mc" in printed.splitlines()[-len(record["members"]) - 3]  # table header


def test_an_unknown_task_is_one_line(family, capsys):
    one_line_error(capsys, ["eval", str(family), "--tasks", "no_such_task_xyz"], "no_such_task_xyz")
