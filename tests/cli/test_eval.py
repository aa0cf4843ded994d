"""``plrd eval FAMILY`` measures on the family's own recorded text and split, so its
perplexities are family.json's; ``--data`` overrides, in either order around DIR."""

from __future__ import annotations

import json

import pytest

from plrd.cli.entry import main

SMALL = ["--seq-len", "32", "--eval-tokens", "128", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def family(tmp_path_factory, cli_inputs):
    model, data = cli_inputs
    out = tmp_path_factory.mktemp("eval") / "fam"
    argv = ["family", "--model", str(model), "--data", str(data), "--out", str(out)]
    argv += ["--sizes", "0.9,0.8", "--tokens-per-stage", "64", "--batch-size", "2"]
    argv += ["--calib-tokens", "128", "--held-out-fraction", "0.3", "--eval-batch-size", "2"]
    assert main(argv + SMALL) == 0
    return out, data


def _ppl_lines(text: str, what: str = "held-out ppl") -> dict[str, str]:
    return {
        line.split(":")[0]: line.split(f"{what} ")[1].split()[0].rstrip(",")
        for line in text.splitlines()
        if what in line
    }


def test_eval_of_a_family_prints_the_perplexities_of_family_json(family, capsys):
    out, data = family
    manifest = json.loads((out / "family.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "the family's own held-out split" in printed and str(data) in printed
    rows = {"parent": manifest["parent"]} | {m["path"]: m for m in manifest["members"]}
    ppl = _ppl_lines(printed)
    assert ppl == {name: f"{m['held_out_ppl']:.2f}" for name, m in rows.items()}
    general = _ppl_lines(printed, "general ppl")
    assert general == {name: f"{m['general_ppl']:.2f}" for name, m in rows.items()}
    kl = _ppl_lines(printed, "KL to parent")
    assert kl == {name: f"{m['kl_to_parent']:.3f}" for name, m in rows.items()}
    member = manifest["members"][-1]
    ratio = member["general_ppl"] / manifest["parent"]["general_ppl"]
    assert f"{member['general_ppl']:.2f} ({ratio:.2f}x parent)" in printed


def test_eval_data_before_dir_and_after_dir_agree(family, capsys, corpus_dir):
    out, _ = family
    capsys.readouterr()
    other = ["--data", str(corpus_dir), "--held-out-fraction", "0.2", *SMALL]
    assert main(["eval", *other, str(out)]) == 0
    before = capsys.readouterr().out
    assert main(["eval", str(out), *other]) == 0
    after = capsys.readouterr().out
    assert str(corpus_dir) in before and "own held-out split" not in before
    assert _ppl_lines(before) == _ppl_lines(after) and len(_ppl_lines(before)) == 3


def test_eval_without_dir_is_a_usage_error(capsys, corpus_dir):
    assert main(["eval", "--data", str(corpus_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DIR" in err
