"""What an option may be, declared once on the option dataclasses: choice lists as ``Literal``
types, numeric ranges as ``Range`` metadata of the field (``ranged``).

Validation and the CLI's ``choices=`` both read these declarations, so a new choice or a new
bound is one edit, and every config object (UpcycleOptions, PrepareOptions, CorpusOptions,
TrainConfig) reports a bad value the same way: ``<option> must be <requirement>, got <value>``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dropup.errors import UserError

# Where and in what precision the analysis commands (eval, analyze) run a model; ``runtime`` in
# dropup.model.io turns a pair into torch objects.
Device = typing.Literal["auto", "cpu", "cuda"]  # auto: CUDA when available
Precision = typing.Literal["auto", "float32", "bfloat16"]  # auto: bfloat16 on CUDA, float32 on the CPU


def literal_args(tp) -> tuple | None:
    """The allowed values of a ``Literal[...]`` type (also inside ``X | None``), else None."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    for arg in typing.get_args(tp):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def choices(cls, name: str) -> tuple:
    """The allowed values of field ``name`` of dataclass ``cls``."""
    values = literal_args(typing.get_type_hints(cls)[name])
    if values is None:
        raise TypeError(f"{cls.__name__}.{name} is not a Literal field")
    return values


def check_choices(obj, label: Callable[[str], str] = lambda name: "--" + name.replace("_", "-")) -> None:
    """Raise ``UserError`` for the first Literal field of ``obj`` whose value is not allowed."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        allowed = literal_args(hints[f.name])
        value = getattr(obj, f.name)
        if allowed is not None and value not in allowed and not (value is None and type(None) in
                                                                  typing.get_args(hints[f.name])):
            raise UserError(f"{label(f.name)} {value!r} is not one of: {', '.join(map(str, allowed))}")


_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@dataclass(frozen=True)
class Range:
    """The values a numeric option may take: a number (an integer if ``integer``), finite, and
    within the given bounds (None: unbounded on that side; ``le`` may name another field of the
    same object, e.g. top_k <= num_experts). Finiteness is checked first because NaN passes no
    comparison: it would slip through every ``x < 0`` test."""

    ge: float | None = None
    gt: float | None = None
    le: float | str | None = None
    lt: float | None = None
    integer: bool = False
    hint: str = ""

    def problem(self, value: Any, obj: Any = None) -> str | None:
        """What ``value`` must be, if it is not; None when it is fine."""
        # bool is an int to Python, never a count or a rate to a user.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            return "an integer" if self.integer else "a number"
        if not math.isfinite(value):
            return "a finite number"
        bounds = []
        for bound, op in ((self.ge, ">="), (self.gt, ">"), (self.le, "<="), (self.lt, "<")):
            if isinstance(bound, str):
                bounds.append((getattr(obj, bound), op, f"{bound} ({getattr(obj, bound)})"))
            elif bound is not None:
                bounds.append((bound, op, _number_text(bound)))
        if all(_OPS[op](value, bound) for bound, op, _ in bounds):
            return None
        return " and ".join(f"{op} {text}" for _, op, text in bounds)

    def check(self, label: str, value: Any, obj: Any = None) -> None:
        problem = self.problem(value, obj)
        if problem:
            raise UserError(f"{label} must be {problem}, got {value!r}" + (f" ({self.hint})" if self.hint else ""))


def _number_text(b: float) -> str:
    if isinstance(b, int) and b > 2**32 and (b & (b - 1) == 0 or (b + 1) & b == 0):
        return f"2^{(b + 1).bit_length() - 1}" + ("" if b & (b - 1) == 0 else " - 1")
    return str(b)


def ranged(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
           metadata: dict | None = None, **bounds) -> Any:
    """A dataclass field whose range is stated beside its default: ``ratio: float = ranged(0.5,
    ge=0, le=1)``. Extra ``metadata`` is kept (the trainer adds its resume rule)."""
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={"range": Range(**bounds), **(metadata or {})})


def check_ranges(obj, label: Callable[[str], str] = lambda name: "--" + name.replace("_", "-"),
                 skip: tuple[str, ...] = ()) -> None:
    """Raise ``UserError`` for the first field of ``obj`` (in declaration order) outside its range.
    None is allowed where the field's type allows it (an option left unset); ``skip`` names
    fields that do not apply to this object's other settings."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        rng = f.metadata.get("range")
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if rng is None or (value is None and type(None) in typing.get_args(hints[f.name])):
            continue
        rng.check(label(f.name), value, obj)
