"""Options declared once: a dataclass field carries its default, help, choices, check and where
it is used, and everything else — validation, the recipe a resume compares, the command-line
flags, the README's flag table — is derived from it.

    tokens_per_stage: int = option(32768, "training tokens after each decomposition",
                                   check=AtLeast(0), recipe=True)

A config holds options and nested configs (``FamilyConfig.train`` is a ``TrainConfig``); their
options share one flat namespace (each name is unique), so the flag of ``train.lr`` is ``--lr``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from plrd.errors import ConfigError

OPTION = "plrd.option"


@dataclass(frozen=True)
class Check:
    """A condition an option's value must meet: ``holds(value)``, described as ``rule``;
    ``explain(value)``, when given, says what is wrong with a value that fails it."""

    holds: Callable[[Any], bool]
    rule: str
    explain: Callable[[Any], str] | None = None

    def problem(self, value: Any) -> str:
        return self.explain(value) if self.explain else f"{self.rule}, got {value!r}"


def AtLeast(low: float) -> Check:  # noqa: N802 (reads as a type in declarations)
    return Check(lambda v: v >= low, f"must be >= {low:g}")


def Between(low: float, high: float, low_open: bool = True, high_open: bool = True) -> Check:  # noqa: N802
    def holds(v: float) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return Check(holds, f"must be in {left}{low:g}, {high:g}{right}")


@dataclass(frozen=True)
class Option:
    """What the field of an option declares beyond its type and default.

    ``commands``: the ``plrd`` subcommands that take it as a flag; ``recipe``: part of what a
    resumed family must share with the run that started it; ``parse``: text → value for the
    command line (raises ValueError with a message for the user); ``show_default``: the
    default as the help text shows it.
    """

    help: str
    choices: tuple[str, ...] | None = None
    checks: tuple[Check, ...] = ()
    commands: tuple[str, ...] = ("family",)
    recipe: bool = False
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    many: bool = False
    show_default: str | None = None


def parse_count(text: str) -> int:
    """``"32_768"`` or ``"32768"`` → 32768."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def parse_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _parser_for(default: Any) -> Callable[[str], Any] | None:
    """How the command line reads an option whose default is ``default`` (None: as text)."""
    if isinstance(default, bool):
        return None  # a switch
    if isinstance(default, int):
        return parse_count
    if isinstance(default, float):
        return parse_number
    return None


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    check: Check | Sequence[Check] = (),
    commands: Sequence[str] = ("family",),
    recipe: bool = False,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    many: bool = False,
    show_default: str | None = None,
) -> Any:
    """A dataclass field declaring one option (see the module docstring)."""
    checks = (check,) if isinstance(check, Check) else tuple(check)
    meta = Option(
        help=help,
        choices=tuple(choices) if choices is not None else None,
        checks=checks,
        commands=tuple(commands),
        recipe=recipe,
        parse=parse if parse is not None else _parser_for(default),
        metavar=metavar,
        many=many,
        show_default=show_default,
    )
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable option defaults are not allowed; use a tuple")
    return field(default=default, metadata={OPTION: meta})


@dataclass(frozen=True)
class Declared:
    """One declared option: its ``name`` (unique across nested configs), field and ``Option``;
    ``path`` is the attribute path from the outer config (``("train", "lr")``)."""

    name: str
    path: tuple[str, ...]
    field: dataclasses.Field
    meta: Option

    @property
    def default(self) -> Any:
        return self.field.default


def declared(config_type: type) -> Iterator[Declared]:
    """The options of ``config_type``, nested configs' options included, in declaration order."""
    for f in dataclasses.fields(config_type):
        if OPTION in f.metadata:
            yield Declared(f.name, (f.name,), f, f.metadata[OPTION])
        elif (inner_type := _nested(f)) is not None:
            for inner in declared(inner_type):
                yield dataclasses.replace(inner, path=(f.name, *inner.path))


def value_of(config: Any, opt: Declared) -> Any:
    for name in opt.path:
        config = getattr(config, name)
    return config


def validate(config: Any) -> None:
    """Raise ``ConfigError`` naming the first option of ``config`` whose value breaks its
    choices or checks."""
    for opt in declared(type(config)):
        value = value_of(config, opt)
        if opt.meta.choices is not None and value not in opt.meta.choices:
            raise ConfigError(
                opt.name, f"must be one of {', '.join(opt.meta.choices)}, got {value!r}"
            )
        for check in opt.meta.checks:
            if not check.holds(value):
                raise ConfigError(opt.name, check.problem(value))


def recipe(config: Any) -> dict[str, Any]:
    """``{name: value}`` of the options marked ``recipe`` (tuples as lists, as JSON has them)."""
    out = {}
    for opt in declared(type(config)):
        if opt.meta.recipe:
            value = value_of(config, opt)
            out[opt.name] = list(value) if isinstance(value, tuple) else value
    return out


def from_values(config_type: type, values: dict[str, Any]) -> Any:
    """Build ``config_type`` (and its nested configs) from flat ``{option name: value}``;
    names not given keep their defaults."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(config_type):
        inner_type = None if OPTION in f.metadata else _nested(f)
        if inner_type is not None:
            kwargs[f.name] = from_values(inner_type, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return config_type(**kwargs)


def _nested(f: dataclasses.Field) -> type | None:
    """The config type of a nested-config field (declared with ``default_factory=Config``)."""
    if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
        return f.default_factory
    return None
