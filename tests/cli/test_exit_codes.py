"""The one map from what went wrong to an exit code: bad input 2, a damaged file or diverged
training 1 (one line each), a bug in plrd 70 with its traceback."""

from __future__ import annotations

import pytest

import plrd.cli.commands as commands
import plrd.cli.entry as entry
from plrd.cli.entry import EXIT_BUG, EXIT_FAILURE, EXIT_USAGE, main
from plrd.errors import DamagedFileError, InputError, TrainingDiverged


def _lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


@pytest.mark.parametrize(
    "error, code",
    [
        (InputError("the corpus is empty"), EXIT_USAGE),
        (DamagedFileError("m/model.safetensors: checksum mismatch"), EXIT_FAILURE),
        (TrainingDiverged("members/size-0.90: training stopped at step 3"), EXIT_FAILURE),
    ],
)
def test_plrd_errors_are_one_line_with_their_exit_code(capsys, monkeypatch, error, code):
    def fail(args):
        raise error

    monkeypatch.setitem(entry.COMMANDS, "info", fail)
    assert main(["info", "somewhere"]) == code
    err = capsys.readouterr().err
    assert _lines(err) == [f"plrd info: error: {error}"]


def test_an_internal_value_error_is_a_bug_with_its_traceback(capsys, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("an internal mistake")

    monkeypatch.setattr(commands, "describe_member", broken)
    import plrd
    from tests.tiny_models import tiny_llama

    plrd.save(tiny_llama(), tmp_path / "m")
    code = main(["info", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == EXIT_BUG and code != EXIT_USAGE
    assert "Traceback" in err and "ValueError: an internal mistake" in err
    assert "bug in plrd" in _lines(err)[-1] and "report" in _lines(err)[-1]


def test_a_bad_flag_is_one_line_and_exit_2(capsys):
    assert main(["family", "--sizes", "0.9,1.5"]) == EXIT_USAGE
    assert _lines(capsys.readouterr().err) == [
        "plrd family: error: --sizes: 1.5 is not in (0, 1); sizes are fractions of the "
        "parent's parameters"
    ]


def test_a_damaged_member_is_one_line_and_exit_1(capsys, tmp_path):
    import plrd
    from tests.tiny_models import tiny_llama

    plrd.save(tiny_llama(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["info", str(tmp_path / "m")]) == EXIT_FAILURE
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and "model.safetensors" in lines[0] and "Traceback" not in lines[0]
