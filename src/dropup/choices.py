"""Choice lists declared once: as ``Literal`` types on the option dataclasses.

Validation and the CLI's ``choices=`` both read the type, so a new choice is one edit.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable

from dropup.errors import UserError


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
