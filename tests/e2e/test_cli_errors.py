"""The command line itself: argparse's errors are one line like every other bad input, --help is
whole, and SIGTERM (how schedulers stop jobs) cleans up like Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dropup.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize("argv,expected", [
    ([], "dropup: error: the following arguments are required: {upcycle,inspect,demo,repro,train,data,generate,eval,analyze} "
         "(see dropup --help)"),
    (["upcycle"], "dropup upcycle: error: the following arguments are required: src, out "
                  "(see dropup upcycle --help)"),
    (["upcycle", "a", "b", "--bogus"], "dropup upcycle: error: unrecognized arguments: --bogus "
                                       "(see dropup upcycle --help)"),
    (["upcycle", "a", "b", "c"], "dropup upcycle: error: unrecognized arguments: c (see dropup upcycle --help)"),
    (["upcycle", "a", "b", "--method", "magic"],
     "dropup upcycle: error: argument --method: invalid choice: 'magic' (choose from 'drop', 'naive', "
     "'noise', 'scratch', 'btx') (see dropup upcycle --help)"),
    # (--ratio takes text, a list or linear:A:B, so its bad values are the options' own one line:
    # tests/convert/test_ratio.py)
    (["upcycle", "a", "b", "--top-k", "abc"],
     "dropup upcycle: error: argument --top-k: invalid int value: 'abc' (see dropup upcycle --help)"),
    (["upcycle", "a", "b", "--num-experts"],
     "dropup upcycle: error: argument --num-experts: expected one argument (see dropup upcycle --help)"),
    (["nosuch"], "dropup: error: argument {upcycle,inspect,demo,repro,train,data,generate,eval,analyze}: invalid choice: 'nosuch' "
                 "(choose from 'upcycle', 'inspect', 'demo', 'repro', 'train', 'data', 'generate', 'eval', 'analyze') (see dropup --help)"),
    (["inspect"], "dropup inspect: error: the following arguments are required: path "
                  "(see dropup inspect --help)"),
    (["data"], "dropup data: error: the following arguments are required: {prepare,corpus} "
               "(see dropup data --help)"),
    (["data", "prepare", "x.jsonl"], "dropup data prepare: error: the following arguments are required: "
                                     "--out (see dropup data prepare --help)"),
    (["data", "prepare", "x.jsonl", "--out", "o", "--vocab-size", "big"],
     "dropup data prepare: error: argument --vocab-size: invalid int value: 'big' "
     "(see dropup data prepare --help)"),
    (["data", "corpus", "--out", "o", "--frob"],
     "dropup data corpus: error: unrecognized arguments: --frob (see dropup data corpus --help)"),
    (["train"], "dropup train: error: the following arguments are required: --config "
                "(see dropup train --help)"),
    (["analyze", "experts"], "dropup analyze experts: error: the following arguments are required: CKPT, "
                             "--out (see dropup analyze experts --help)"),
])
def test_argparse_errors_are_one_line_with_a_pointer_to_help(capsys, argv, expected):
    assert _usage_error(capsys, argv) == expected


@pytest.mark.parametrize("argv", [["--help"], ["upcycle", "--help"], ["data", "prepare", "--help"]])
def test_help_is_still_the_whole_usage(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dropup") and "options:" in out and len(out.splitlines()) > 5


def test_real_entry_point_usage_error():
    r = subprocess.run([sys.executable, "-m", "dropup", "upcycle", "--top-k", "abc"], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("dropup upcycle: error: argument --top-k: invalid int value: 'abc' "
                        "(see dropup upcycle --help)\n")


def test_sigterm_handler_is_restored(dense_models, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["upcycle", str(dense_models["llama"]), str(tmp_path / "out"), "--quiet"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


# ---- signals: a scheduler's SIGTERM cleans up like Ctrl-C ------------------------------------------

# The real `python -m dropup` entry point, with the writer held after its first tensor so that the
# signal lands mid-write, while the hidden temporary output is on disk, however loaded the machine.
_SLOW_UPCYCLE = textwrap.dedent("""
    import runpy, sys, time
    from dropup.hub import safetensors

    real = safetensors.ShardedWriter.write

    def write(self, name, tensor):
        real(self, name, tensor)
        time.sleep(600)

    safetensors.ShardedWriter.write = write
    sys.argv = ["dropup", *sys.argv[1:]]
    runpy.run_module("dropup", run_name="__main__")
""")


def _as_from_a_shell() -> None:
    """In the child before exec: SIGINT at its default and no signal blocked, as for a shell's
    foreground job. The test process may have inherited or set other dispositions (seen under
    pytest-xdist: the SIGINT case hung, its signal never delivered), and exec keeps SIG_IGN and
    the mask, so a child would ignore the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.dropup-")]


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_write_removes_the_temporary_and_exits_128_plus_signal(dense_models, tmp_path, sig, code):
    src = tmp_path / "src"
    shutil.copytree(dense_models["llama"], src)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_UPCYCLE, "upcycle", str(src), str(out),
                             "--num-experts", "16", "--max-shard-size", "20KB", "--quiet"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_shell)
    try:
        deadline = time.monotonic() + 120
        # The first shard file in the temporary: the writer has started and is now held.
        while not any(tmp.is_dir() and any(tmp.glob("model-*.safetensors")) for tmp in _temporaries(out)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the temporary output never appeared"
            time.sleep(0.02)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert stderr == "dropup upcycle: interrupted; nothing was left half-written\n"
    assert stdout == ""
    assert not out.exists()
    assert _temporaries(out) == []


def test_every_option_has_help_text():
    """`dropup CMD --help` must explain every flag and argument (issue 12)."""
    import argparse

    from dropup.cli import build_parser

    missing = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*prefix, name])
            elif not action.help:
                missing.append(" ".join([*prefix, *(action.option_strings or [action.dest])]))

    walk(build_parser(), ["dropup"])
    assert not missing, missing
