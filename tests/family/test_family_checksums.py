"""Checksums in the family: family.json records each member's SHA-256; ``plrd eval`` and
``plrd info`` refuse a damaged member naming its file; resuming rebuilds a damaged member (and
restarts a stage whose checkpoint is damaged) instead of using it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plrd.cli.entry import EXIT_FAILURE, main
from plrd.family.schedule import build_family
from plrd.family.train_state import STATE_TENSORS, checkpoint_dir
from plrd.io.checkpoint import weights_checksum
from plrd.io.members import verify_member
from tests.helpers import one_line_error


class Stop(Exception):
    pass


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def _tensors(member: Path) -> dict[str, torch.Tensor]:
    return load_file(str(member / "model.safetensors"))


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = _tensors(a), _tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def family(make_config, tmp_path):
    cfg = make_config(tokens_per_stage=2 * 2 * 32, out=tmp_path / "fam")
    manifest = build_family(cfg, say=lambda m: None)
    keep = tmp_path / "pristine"
    shutil.copytree(cfg.out, keep)
    return cfg, manifest, keep


def test_members_record_their_checksum(family):
    cfg, manifest, _ = family
    for m in manifest["members"]:
        assert m["sha256"] == weights_checksum(Path(cfg.out) / m["path"])
    on_disk = json.loads((Path(cfg.out) / "family.json").read_text())
    assert [m["sha256"] for m in on_disk["members"]] == [m["sha256"] for m in manifest["members"]]


def test_eval_and_info_refuse_a_damaged_member(family, capsys, corpus_dir):
    cfg, _, _ = family
    out = Path(cfg.out)
    assert main(["info", str(out)]) == 0
    assert "weights verified" in capsys.readouterr().out
    weights = out / "members" / "size-0.80" / "model.safetensors"
    _flip_byte(weights)
    eval_args = ["--data", str(corpus_dir), "--seq-len", "32", "--held-out-fraction", "0.2"]
    one_line_error(
        capsys, ["eval", str(out), *eval_args], str(weights), "checksum mismatch", code=EXIT_FAILURE
    )
    one_line_error(capsys, ["info", str(out)], str(weights), "checksum mismatch", code=EXIT_FAILURE)
    one_line_error(
        capsys, ["info", str(weights.parent)], str(weights), "checksum mismatch", code=EXIT_FAILURE
    )
    one_line_error(
        capsys, ["eval", str(weights.parent), *eval_args], "checksum mismatch", code=EXIT_FAILURE
    )


def test_a_swapped_member_is_caught_by_the_family_checksum(family, capsys):
    cfg, _, _ = family
    members = Path(cfg.out) / "members"
    # a self-consistent member directory (weights match its own plrd.json) in the wrong place
    shutil.rmtree(members / "size-0.90")
    shutil.copytree(members / "size-0.80", members / "size-0.90")
    verify_member(members / "size-0.90")
    one_line_error(
        capsys, ["info", str(Path(cfg.out))], "size-0.90", "checksum mismatch", code=EXIT_FAILURE
    )


def test_resume_rebuilds_a_damaged_member(family, make_config):
    cfg, manifest, pristine = family
    out = Path(cfg.out)
    _flip_byte(out / "members" / "size-0.90" / "model.safetensors")
    messages = []
    again = build_family(cfg, say=messages.append)
    assert any(
        "size-0.90: finished earlier but damaged" in m and "rebuilding" in m for m in messages
    )
    assert any("size-0.80: finished earlier, skipped" in m for m in messages)
    assert [m["size"] for m in again["members"]] == [0.9, 0.8]
    rebuilt = out / "members" / "size-0.90"
    verify_member(rebuilt, again["members"][0]["sha256"])
    assert _same_tensors(rebuilt, pristine / "members" / "size-0.90")  # CPU: bit-identical
    assert again["members"][0]["params"] == manifest["members"][0]["params"]


def test_a_member_saved_without_its_entry_is_verified_then_recorded(family):
    cfg, manifest, _ = family
    out = Path(cfg.out)
    doc = json.loads((out / "family.json").read_text())
    doc["members"] = doc["members"][:1]
    for m in doc["members"]:
        del m["sha256"]  # written by an older plrd: the checksum is filled in
    (out / "family.json").write_text(json.dumps(doc))
    messages = []
    again = build_family(cfg, say=messages.append)
    assert sum("finished earlier, recorded" in m for m in messages) == 2
    assert [m["sha256"] for m in again["members"]] == [m["sha256"] for m in manifest["members"]]


def test_a_damaged_stage_checkpoint_restarts_the_stage(make_config, tmp_path):
    straight = build_family(make_config(out=tmp_path / "a"), say=lambda m: None)

    cfg = make_config(out=tmp_path / "b")
    calls = []

    def stop(step):
        calls.append(step)
        if len(calls) == 6 + 3:
            raise Stop

    with pytest.raises(Stop):
        build_family(cfg, on_step=stop, say=lambda m: None)
    ckpt = checkpoint_dir(tmp_path / "b" / "stages" / "size-0.80")
    _flip_byte(ckpt / STATE_TENSORS, 10)
    messages = []
    resumed = build_family(cfg, say=messages.append)
    assert any("checkpoint is damaged" in m and "starting the stage again" in m for m in messages)
    for x, y in zip(straight["members"], resumed["members"], strict=True):
        assert x["params"] == y["params"]
        assert x["held_out_ppl"] == pytest.approx(y["held_out_ppl"], rel=1e-6)
        assert _same_tensors(tmp_path / "a" / x["path"], tmp_path / "b" / y["path"])
