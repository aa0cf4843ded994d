"""What a user sees: the plot, parameter counts, throughput timing, help, progress bars."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from plrd.cli.entry import build_parser, main
from plrd.core.counting import format_params
from plrd.family.evaluate import evaluate


def _manifest() -> dict:
    return {
        "parent": {"name": "tiny", "params": 260_000, "held_out_ppl": 300.0, "general_ppl": 380.0},
        "config": {"tokens_per_stage": 384},
        "members": [
            {
                "size": 0.8,
                "params": 206_400,
                "zero_shot_ppl": 340.0,
                "held_out_ppl": 290.0,
                "zero_shot_general_ppl": 500.0,
                "general_ppl": 420.0,
                "kl_to_parent": 0.4,
            },
            {
                "size": 0.65,
                "params": 170_200,
                "zero_shot_ppl": 400.0,
                "held_out_ppl": 310.0,
                "zero_shot_general_ppl": 700.0,
                "general_ppl": 520.0,
                "kl_to_parent": 0.6,
            },
        ],
    }


def test_legend_covers_no_point_and_no_label():
    pytest.importorskip("matplotlib")
    from plrd.family.plot import draw_family

    fig = draw_family(_manifest())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert len(fig.axes) == 2  # held-out and general perplexity
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert len(ax.get_lines()) == 3
        for line in ax.get_lines():
            for x, y in ax.transData.transform(line.get_xydata()):
                assert not legend.contains(x, y), line.get_label()
        for text in ax.texts:
            assert not legend.overlaps(text.get_window_extent(renderer)), text.get_text()


def test_parameter_counts_tell_close_sizes_apart():
    assert format_params(206_400) != format_params(170_200)
    assert format_params(134_515_008) == "134.5M"
    assert format_params(950) == "950"


class _ColdFirstCall(torch.nn.Module):
    """A model whose first forward pays a one-time cost, like a cold start."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, use_cache=False):
        self.calls += 1
        if self.calls == 1:
            time.sleep(0.5)
        logits = torch.zeros(*input_ids.shape, 8) + self.weight
        return type("Out", (), {"logits": logits})()


def test_throughput_is_timed_warm_with_the_thread_count():
    model = _ColdFirstCall()
    blocks = torch.randint(0, 8, (4, 16))
    result = evaluate(model, blocks, batch_size=2)
    assert result.tokens_per_s > 32 / 0.5 * 4  # the cold call is not in the timing
    assert result.threads == torch.get_num_threads()


def test_help_shows_zero_defaults():
    family = build_parser()._subparsers._group_actions[0].choices["family"]
    lines = [line for line in family.format_help().splitlines() if "random seed" in line]
    assert lines and "(default: 0)" in lines[0]


@pytest.mark.parametrize("command", ["family", "decompose", "eval", "info"])
def test_every_subcommand_takes_no_progress(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    assert any("--no-progress" in a.option_strings for a in sub._actions)


def test_decompose_size_out_of_reach_speaks_of_size(capsys, tmp_path, tiny_model_dir, corpus_dir):
    argv = ["decompose", "--size", "0.02", "--out", str(tmp_path / "m"), "--model"]
    argv += [str(tiny_model_dir), "--data", str(corpus_dir), "--seq-len", "32"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--sizes" not in err and "size 0.02 is out of reach" in err


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, cli_inputs):
    model, data = cli_inputs
    argv = [sys.executable, "-m", "plrd", "family", "--model", str(model), "--data", str(data)]
    argv += ["--out", str(tmp_path / "fam"), "--sizes", "0.9", "--tokens-per-stage", "64"]
    argv += ["--seq-len", "32", "--eval-tokens", "64", "--calib-tokens", "64", "--device", "cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "it/s" not in done.stderr and "step/s" not in done.stderr
