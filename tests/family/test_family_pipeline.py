"""The family end to end on a tiny Llama: manifest, members that reload and generate, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from plrd import LowRankLinear, load_pretrained
from plrd.cli.display import format_table
from plrd.family.record import size_key
from plrd.family.schedule import build_family

MEMBER_FIELDS = {
    "size",
    "params",
    "path",
    "tokens",
    "zero_shot_ppl",
    "held_out_ppl",
    "tokens_per_s",
    "seconds",
}


class Stop(Exception):
    pass


def _quiet(_msg: str) -> None:
    pass


def _build(make_config, **kw):
    torch.set_num_threads(1)
    cfg = make_config(**kw)
    return cfg, build_family(cfg, say=_quiet)


def test_family_end_to_end(make_config, tiny_model_dir):
    from plrd import count_parameters, load_pretrained
    from plrd.core.layer import LowRankLinear
    from plrd.io.models import load_model

    cfg, manifest = _build(make_config)
    out = cfg.out
    on_disk = json.loads((Path(out) / "family.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    parent = manifest["parent"]
    assert set(parent) >= {"name", "params", "held_out_ppl", "tokens_per_s"}
    assert [m["size"] for m in manifest["members"]] == [0.9, 0.8]
    for m in manifest["members"]:
        assert set(m) >= MEMBER_FIELDS
        assert m["path"] == f"members/{size_key(m['size'])}"
        assert abs(m["params"] / parent["params"] - m["size"]) < 0.01
        assert m["tokens"] == cfg.train.tokens_per_stage
        assert all(math.isfinite(m[k]) for k in ("zero_shot_ppl", "held_out_ppl"))
    assert (Path(out) / "family.png").stat().st_size > 1000
    table = format_table(manifest)
    assert "members/size-0.80" in table and "parent" in table

    # each member reloads with identical logits and generates
    ids = torch.arange(3, 19).view(1, 16)
    for m in manifest["members"]:
        path = f"{out}/{m['path']}"
        model = load_pretrained(path)
        assert any(isinstance(x, LowRankLinear) for x in model.modules())
        assert count_parameters(model) == m["params"]
        again, tok, _ = load_model(path)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, again(ids).logits)
        gen = model.generate(
            ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id
        )
        assert gen.shape == (1, 9)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_member_chain_starts_from_the_previous_member(make_config):
    cfg, manifest = _build(make_config, tokens_per_stage=0)
    first, second = manifest["members"]
    assert first["held_out_ppl"] == pytest.approx(first["zero_shot_ppl"])
    assert first["tokens"] == 0
    # without training, the second member is a truncation of the first: each factored layer has
    # a lower rank and its ``up`` lies in the column space of the first member's ``up``
    a = load_pretrained(Path(cfg.out) / first["path"])
    b = load_pretrained(Path(cfg.out) / second["path"])
    factored = {n: m for n, m in a.named_modules() if isinstance(m, LowRankLinear)}
    assert factored
    for name, layer in factored.items():
        later = b.get_submodule(name)
        assert later.rank <= layer.rank, name
        basis, _ = torch.linalg.qr(layer.up.detach().double())
        up = later.up.detach().double()
        assert torch.linalg.norm(up - basis @ (basis.T @ up)) <= 1e-6 * torch.linalg.norm(up)


def test_interrupted_family_resumes_to_the_same_manifest(make_config, tmp_path):
    def drop_timing(manifest):
        # sha256 too: the safetensors header's metadata order may differ for equal tensors
        keys = ("tokens_per_s", "seconds", "train_seconds", "sha256")
        members = [{k: v for k, v in m.items() if k not in keys} for m in manifest["members"]]
        return members, manifest["parent"]["held_out_ppl"]

    _, straight = _build(make_config, out=tmp_path / "straight")

    calls = []

    def stop_in_second_stage(step):
        calls.append(step)
        if len(calls) == 6 + 3:  # 6 steps of stage 1, then 3 of stage 2
            raise Stop

    cfg = make_config(out=tmp_path / "resumed")
    with pytest.raises(Stop):
        build_family(cfg, on_step=stop_in_second_stage, say=_quiet)
    partial = json.loads((tmp_path / "resumed" / "family.json").read_text())
    assert [m["size"] for m in partial["members"]] == [0.9]
    assert (tmp_path / "resumed" / "stages" / "size-0.80" / "checkpoint").is_dir()

    messages = []
    resumed = build_family(cfg, say=messages.append)
    assert any("finished earlier, skipped" in m for m in messages)
    assert any("resuming" in m for m in messages)
    a, b = drop_timing(straight), drop_timing(resumed)
    assert a[1] == b[1]
    for x, y in zip(a[0], b[0], strict=True):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], rel=1e-6), k
            else:
                assert x[k] == y[k], k
    assert not (tmp_path / "resumed" / "stages" / "size-0.80" / "checkpoint").exists()

    # a third run does nothing new
    again = build_family(cfg, say=_quiet)
    assert again["members"] == resumed["members"]


def test_resume_with_other_settings_is_refused(make_config, tmp_path):
    _build(make_config, tokens_per_stage=0, sizes=(0.9,))
    with pytest.raises(ValueError, match="other settings"):
        _build(make_config, tokens_per_stage=64, sizes=(0.9,))
    with pytest.raises(ValueError, match="must start with"):
        _build(make_config, tokens_per_stage=0, sizes=(0.8,))
    # extending the same recipe with a smaller size is allowed
    _, manifest = _build(make_config, tokens_per_stage=0, sizes=(0.9, 0.85))
    assert [m["size"] for m in manifest["members"]] == [0.9, 0.85]
