"""What ``--ratio`` may be: one r for every layer, one r per layer, or a schedule over depth.

A spec has one canonical form, which is what ``UpcycleOptions.ratio`` holds after validation and
what ``upcycling.json`` records under ``options.ratio``:

- a number (``0.5``): every layer (the paper's setting; its records are those of before);
- a tuple of numbers (``0.25,0.5,0.75`` on the command line; a JSON list in the record): layer l
  gets value l, so there must be one per layer of SRC;
- ``"linear:A:B"``: layer l of L gets A + (B - A) * l / (L - 1), computed as
  A * (1 - t) + B * t with t = l / (L - 1) so that the first and last layers get A and B exactly;
  L = 1 gives A.

``parse`` turns any accepted input into that form and ``per_layer`` turns it into the layers'
values once SRC's depth is known; everything that needs a layer's r asks them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

from dropup.errors import UserError

Ratio = float | tuple[float, ...] | str  # canonical: see the module docstring
LINEAR = "linear"

_FORMS = ("write a number (0.5), one per layer (0.25,0.5,0.75) or linear:A:B (A at the first layer, "
          "B at the last)")


def parse(value: object, check: Callable[[str, float], None]) -> Ratio:
    """The canonical form of a ``--ratio`` value (a number, a sequence of numbers, or text in one
    of the three forms); ``check(label, number)`` raises for a number out of range. UserError
    when the value is none of the forms."""
    if isinstance(value, str):
        return _parse_text(value.strip(), check)
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        if not value:
            raise UserError(f"--ratio [] has no values; {_FORMS}")
        return _checked(tuple(value), check, f"each value of --ratio {list(value)}")
    return _number(value, check, "--ratio")


def _parse_text(text: str, check: Callable[[str, float], None]) -> Ratio:
    if text.lower().startswith(LINEAR + ":"):
        ends = text.split(":")[1:]
        numbers_ = [_float(x) for x in ends]
        if len(ends) != 2 or None in numbers_:
            raise UserError(f"--ratio {text!r} is not a schedule: write linear:A:B, e.g. linear:0.25:0.75")
        a, b = _checked(tuple(numbers_), check, f"each end of --ratio {text}")
        return f"{LINEAR}:{a!r}:{b!r}"
    if "," in text:
        values = [_float(x) for x in text.split(",")]
        if None in values:
            raise UserError(f"--ratio {text!r} is not a list of numbers; {_FORMS}")
        return _checked(tuple(values), check, f"each value of --ratio {text}")
    single = _float(text)
    if single is None:
        raise UserError(f"--ratio {text!r} is not a ratio; {_FORMS}")
    return _number(single, check, "--ratio")


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _number(value: object, check: Callable[[str, float], None], label: str) -> float:
    # bool is an int to Python, never a ratio to a user; the range check says what it must be.
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)  # numpy scalars: upcycling.json needs plain numbers
    check(label, value)
    return value


def _checked(values: tuple, check: Callable[[str, float], None], label: str) -> tuple[float, ...]:
    return tuple(_number(v, check, label) for v in values)


def is_per_layer(spec: Ratio) -> bool:
    return not isinstance(spec, float | int)


def per_layer(spec: Ratio, layers: int) -> tuple[float, ...]:
    """r of each of ``layers`` layers; UserError when a list's length is not the depth."""
    if isinstance(spec, str):
        a, b = (float(x) for x in spec.split(":")[1:])
        if layers == 1:
            return (a,)
        return tuple(a * (1 - t) + b * t for t in (layer / (layers - 1) for layer in range(layers)))
    if isinstance(spec, tuple | list):
        if len(spec) != layers:
            raise UserError(f"--ratio lists {len(spec)} values, but SRC has {layers} layers; give one "
                            f"per layer, a single value, or a schedule such as linear:0.25:0.75")
        return tuple(float(v) for v in spec)
    return (float(spec),) * layers


def text(spec: Ratio) -> str:
    """The spec as it is written on the command line (a list comma-separated)."""
    if isinstance(spec, tuple | list):
        return ",".join(str(v) for v in spec)
    return str(spec)


def recorded(provenance: dict) -> tuple[float, ...] | None:
    """The per-layer r an ``upcycling.json`` record states (``ratio_per_layer``, written where the
    spec is per layer), None where one r applies to every layer (``options.ratio``)."""
    values = provenance.get("ratio_per_layer")
    if values is None:
        return None
    if not isinstance(values, list) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                               and math.isfinite(v) for v in values):
        raise ValueError("'ratio_per_layer' is not a list of numbers")
    return tuple(float(v) for v in values)
