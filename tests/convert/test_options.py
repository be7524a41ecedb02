"""Options declared once: the CLI's choices are the option dataclasses' Literal types, upcycle takes
an UpcycleOptions or keywords, and the methods table is what verify reads."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from dropup import upcycle
from dropup.cli import build_parser
from dropup.convert.methods import METHODS
from dropup.convert.upcycle import UpcycleOptions
from dropup.convert.verify import expects_dense_logits
from dropup.data.prepare import PrepareOptions
from dropup.errors import UserError
from dropup.options import literal_args


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("command,cls", [(("upcycle",), UpcycleOptions),
                                         (("data", "prepare"), PrepareOptions)])
def test_cli_choices_are_the_literal_types(command, cls):
    actions = {a.dest: a for a in _subparser(build_parser(), *command)._actions}
    hints = typing.get_type_hints(cls)
    literal = {f.name: literal_args(hints[f.name]) for f in dataclasses.fields(cls)
               if literal_args(hints[f.name]) is not None}
    assert literal, cls
    for name, allowed in literal.items():
        assert tuple(actions[name].choices) == allowed, name
    # and no flag has a choice list of its own
    assert {d for d, a in actions.items() if a.choices and d != "help"} == set(literal)


def test_choice_lists_have_one_home():
    from dropup.data.readers import DOC_SPLITS
    from dropup.hub.names import TARGET_TYPES
    from dropup.hub.safetensors import DTYPE_NAMES

    hints = typing.get_type_hints(UpcycleOptions)
    assert literal_args(hints["method"]) == tuple(METHODS)
    assert literal_args(hints["target"]) == ("auto", *TARGET_TYPES)
    assert literal_args(hints["dtype"]) == ("auto", *DTYPE_NAMES)
    assert literal_args(typing.get_type_hints(PrepareOptions)["doc_split"]) == DOC_SPLITS


@pytest.mark.parametrize("field,value", [("method", "magic"), ("index_sampling", "none"),
                                         ("reinit_stats", "global"), ("router_init", "ones"),
                                         ("target", "gpt2"), ("dtype", "float8")])
def test_bad_choice_is_named(field, value):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(UserError, match=f"^{flag} '{value}' is not one of: "):
        UpcycleOptions(**{field: value}).validate()


def test_upcycle_takes_options_or_keywords(dense_models, tmp_path):
    src = dense_models["llama"]
    by_kw = upcycle(src, tmp_path / "kw", method="noise", ratio=0.25, num_experts=4, progress=False)
    opts = UpcycleOptions(method="noise", ratio=0.25, num_experts=4, progress=False)
    by_opts = upcycle(src, tmp_path / "opts", opts)
    mixed = upcycle(src, tmp_path / "mixed", UpcycleOptions(method="noise", num_experts=4), ratio=0.25,
                    progress=False)
    for prov in (by_opts, mixed):
        assert prov["options"] == by_kw["options"]
    weights = {d: (tmp_path / d / "model.safetensors").read_bytes() for d in ("kw", "opts", "mixed")}
    assert weights["opts"] == weights["kw"] and weights["mixed"] == weights["kw"]
    assert opts == UpcycleOptions(method="noise", ratio=0.25, num_experts=4, progress=False)  # not mutated
    with pytest.raises(TypeError, match="unknown upcycle option.*ratoi"):
        upcycle(src, tmp_path / "typo", ratoi=0.5)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_verify_reads_the_methods_table(method, ratio):
    m = METHODS[method]
    prov = {"options": {"method": method, "ratio": ratio}, "function_preserving_target": True}
    assert expects_dense_logits(prov) == m.preserves_dense(ratio)
    assert not expects_dense_logits({**prov, "function_preserving_target": False})
    # preserving the dense function takes plain copies of one source and the non-FFN tensors as they are
    assert not m.preserves_dense(ratio) or (m.copies(ratio) and m.non_ffn == "copy")
    assert m.builder(ratio) is (METHODS["naive"].expert if m.copies(ratio) else m.expert)
