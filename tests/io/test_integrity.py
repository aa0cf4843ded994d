"""Checkpoint integrity: checksums, truncated/altered/swapped files, interrupted saves."""

import json

import pytest
import torch
from torch import nn

import plrd
from plrd.errors import DamagedFileError, InputError
from plrd.io import checkpoint
from plrd.io.checkpoint import verify_checkpoint
from plrd.io.info import INFO_FILE, WEIGHTS_FILE
from plrd.io.integrity import read_safetensors_header, sha256_file
from tests.helpers import decomposed, logits, snapshot, unchanged, written
from tests.tiny_models import tiny_llama


def _info(path):
    return json.loads((path / INFO_FILE).read_text())


def _write_info(path, info):
    (path / INFO_FILE).write_text(json.dumps(info))


@pytest.fixture
def saved(tmp_path):
    model = decomposed()
    plrd.save(model, tmp_path)
    return tmp_path, model


def test_save_records_size_and_checksum(saved):
    path, model = saved
    weights = path / WEIGHTS_FILE
    record = _info(path)["weights"]
    assert record == {
        "file": WEIGHTS_FILE,
        "bytes": weights.stat().st_size,
        "sha256": sha256_file(weights),
    }
    assert plrd.weights_checksum(path) == record["sha256"]
    assert verify_checkpoint(path, sha256=record["sha256"].upper())["weights"] == record
    fresh = plrd.load(path, tiny_llama())
    assert torch.equal(logits(fresh), logits(model))


def test_altered_byte_is_refused_unless_verify_is_off(saved):
    path, model = saved
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's data: same size, valid header
    weights.write_bytes(bytes(data))
    fresh = tiny_llama()
    state = snapshot(fresh)
    message = rf"{WEIGHTS_FILE}: checksum mismatch \(expected sha256 [0-9a-f]{{64}}, got [0-9a-f]"
    with pytest.raises(DamagedFileError, match=message + ".*corrupt or was modified.*re-save"):
        plrd.load(path, fresh)
    assert unchanged(fresh, state)
    with pytest.raises(DamagedFileError, match="checksum mismatch"):
        verify_checkpoint(path)
    plrd.load(path, fresh, verify=False)  # the caller takes responsibility
    assert not torch.equal(logits(fresh), logits(model))


def test_truncated_weights_are_named_as_truncated(saved):
    path, _ = saved
    weights = path / WEIGHTS_FILE
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size - 1000])
    fresh = tiny_llama()
    state = snapshot(fresh)
    for verify in (True, False):  # the header check does not need the recorded digest
        with pytest.raises(
            DamagedFileError, match=rf"{WEIGHTS_FILE}: the header describes .*truncated"
        ):
            plrd.load(path, fresh, verify=verify)
    assert unchanged(fresh, state)
    weights.write_bytes(weights.read_bytes()[:5])
    with pytest.raises(DamagedFileError, match=rf"{WEIGHTS_FILE}: 5 bytes is too short"):
        plrd.load(path, fresh)
    weights.write_bytes(weights.read_bytes()[:5] + b"\x00" * 100)
    with pytest.raises(DamagedFileError, match=rf"{WEIGHTS_FILE}: the header length word says"):
        plrd.load(path, fresh)


def test_appended_bytes_are_refused(saved):
    path, _ = saved
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes() + b"\x00" * 8)
    with pytest.raises(DamagedFileError, match=rf"{WEIGHTS_FILE}: 8 bytes follow the last tensor"):
        plrd.load(path, tiny_llama())


def test_size_mismatch_reported_before_hashing(saved, monkeypatch):
    path, _ = saved
    info = _info(path)
    info["weights"]["bytes"] += 1
    _write_info(path, info)
    monkeypatch.setattr(checkpoint, "sha256_file", None)  # must not be needed
    with pytest.raises(
        DamagedFileError, match=r"size mismatch \(expected [\d,]+ bytes, got [\d,]+\)"
    ):
        plrd.load(path, tiny_llama())


def test_weights_of_another_save_are_refused_with_the_layer_named(tmp_path):
    plrd.save(decomposed(keep=0.6), tmp_path / "a")
    plrd.save(decomposed(keep=0.8), tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(DamagedFileError, match="size mismatch .* longer than when it was written"):
        plrd.load(tmp_path / "a", tiny_llama())
    # without the digest, the ranks still give it away, naming the layer and both files
    rank_clash = rf"{WEIGHTS_FILE}: holds layer 'model\.layers\.0\.mlp\.down_proj' at rank"
    with pytest.raises(DamagedFileError, match=rank_clash + rf".*{INFO_FILE} records rank"):
        plrd.load(tmp_path / "a", tiny_llama(), verify=False)


def test_manifest_and_weights_disagree_on_which_layers_are_factored(tmp_path):
    dense = tiny_llama()
    plrd.save(dense, tmp_path / "dense")
    plrd.save(decomposed(), tmp_path / "factored")
    info = _info(tmp_path / "factored")
    info["weights"] = _info(tmp_path / "dense")["weights"]
    _write_info(tmp_path / "dense", info)  # factored layers recorded, dense weights on disk
    clash = r"dense weight for layer 'model\.layers\.0\..*records it as factored"
    with pytest.raises(DamagedFileError, match=clash):
        plrd.load(tmp_path / "dense", tiny_llama())

    info = _info(tmp_path / "factored")
    info["layers"] = []
    _write_info(tmp_path / "factored", info)
    model = tiny_llama()
    state = snapshot(model)
    with pytest.raises(DamagedFileError, match=rf"factored tensor .* {INFO_FILE} does not record"):
        plrd.load(tmp_path / "factored", model)
    assert unchanged(model, state)


def test_parameter_count_mismatch_is_refused(saved):
    path, _ = saved
    info = _info(path)
    info["num_parameters"] += 7
    _write_info(path, info)
    with pytest.raises(DamagedFileError, match=rf"{INFO_FILE}: records [\d,]+ parameters"):
        plrd.load(path, tiny_llama())


def test_untied_model_refuses_tied_checkpoint(tmp_path):
    plrd.save(tiny_llama(tie=True), tmp_path)
    missing = r"tensor '(lm_head|model\.embed_tokens)\.weight' .* is missing"
    with pytest.raises(DamagedFileError, match=missing):
        plrd.load(tmp_path, tiny_llama(tie=False))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i: i.pop("weights"), r'"weights" = None needs file'),
        (lambda i: i["weights"].update(sha256="abc"), "sha256 \\(64 hex digits\\)"),
        (lambda i: i["layers"].append(dict(i["layers"][0])), "is listed twice"),
        (lambda i: i.update(num_parameters="many"), "num_parameters"),
        (lambda i: i.update(format_version=True), "format_version True"),
    ],
)
def test_malformed_manifest_is_refused(saved, edit, message):
    path, _ = saved
    info = _info(path)
    edit(info)
    _write_info(path, info)
    with pytest.raises(DamagedFileError, match=rf"{INFO_FILE}: .*{message}"):
        plrd.load(path, tiny_llama())


def test_unreadable_manifest_names_the_file(saved):
    path, _ = saved
    (path / INFO_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DamagedFileError, match=rf"{INFO_FILE}: cannot be read as JSON"):
        plrd.load(path, tiny_llama())


def test_format_1_manifest_without_digest_still_loads(saved):
    path, model = saved
    info = _info(path)
    del info["weights"]
    info["format_version"] = 1
    _write_info(path, info)
    assert verify_checkpoint(path)["format_version"] == 1
    fresh = plrd.load(path, tiny_llama())
    assert torch.equal(logits(fresh), logits(model))


def test_interrupted_save_never_leaves_a_manifest_for_other_weights(tmp_path, monkeypatch):
    old = decomposed(keep=0.6)
    plrd.save(old, tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    # killed while writing the weights: the old checkpoint is intact
    monkeypatch.setattr("safetensors.torch.save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        plrd.save(decomposed(keep=0.8), tmp_path)
    monkeypatch.undo()
    assert written(tmp_path) == [WEIGHTS_FILE, INFO_FILE]
    assert torch.equal(logits(plrd.load(tmp_path, tiny_llama())), logits(old))

    # killed after the new weights are in place, before the manifest: refused as incomplete
    monkeypatch.setattr(checkpoint, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        plrd.save(decomposed(keep=0.8), tmp_path)
    assert written(tmp_path) == [WEIGHTS_FILE]
    with pytest.raises(DamagedFileError, match=rf"{INFO_FILE} not found beside .*interrupted"):
        plrd.load(tmp_path, tiny_llama())


def test_family_checksum_cross_check(saved):
    path, _ = saved
    digest = plrd.weights_checksum(path)
    verify_checkpoint(path, sha256=digest)
    with pytest.raises(DamagedFileError, match=rf"{WEIGHTS_FILE}: checksum mismatch"):
        verify_checkpoint(path, sha256="0" * 64)
    with pytest.raises(InputError, match="not a 64-digit hex"):
        verify_checkpoint(path, sha256="xyz")
    with pytest.raises(DamagedFileError, match=rf"{WEIGHTS_FILE} not found"):
        plrd.weights_checksum(path / "nowhere")


def test_header_check_matches_safetensors(saved):
    path, model = saved
    header = read_safetensors_header(path / WEIGHTS_FILE)
    state = model.state_dict()
    assert all(tuple(state[k].shape) == shape for k, (_, shape) in header.items())
    assert {dtype for dtype, _ in header.values()} == {"F32"}


def test_load_rejects_a_missing_directory_and_a_file_target(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        plrd.load(tmp_path / "nowhere", tiny_llama())
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a directory"):
        plrd.save(nn.Linear(2, 2), tmp_path / "file")


def test_load_pretrained_verifies_the_weights(tmp_path):
    model = decomposed()
    plrd.save(model, tmp_path)
    model.config.save_pretrained(tmp_path)
    loaded = plrd.load_pretrained(tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    weights = tmp_path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=rf"{WEIGHTS_FILE}: checksum mismatch"):
        plrd.load_pretrained(tmp_path)
