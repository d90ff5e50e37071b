"""What a new user meets first: every option's default in --help, a missing optional extra named in
one line, `inspect` printing a slot plan without being asked, and install extras that agree."""

import argparse
import sys
import types
from pathlib import Path

import pytest

from edge_preattn import cli
from edge_preattn.model import layout
from edge_preattn.model.synth import write_synthetic

REPO = Path(__file__).resolve().parents[1]


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_every_option_with_a_default_shows_it_in_help(verb):
    parser = verb_parsers()[verb]
    for action in parser._actions:
        unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if action.option_strings and not unset:
            listed = " ".join(parser._get_formatter()._format_action(action).split())
            assert "default" in listed, f"{verb}: {listed}"


def test_a_missing_extra_is_one_line(monkeypatch, capsys):
    def main(_args):
        import torch  # noqa: F401

    verb = types.ModuleType("needs_torch")
    verb.HELP, verb.EXAMPLES, verb.add_args, verb.main = "x", "", lambda parser: None, main
    monkeypatch.setitem(sys.modules, "needs_torch", verb)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as if not installed
    monkeypatch.setattr(cli, "VERBS", {"train": "needs_torch"})
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train needs torch, which is not installed" in err[0] and ".[train]" in err[0]


def test_inspect_prints_the_slot_plan_by_default(tmp_path, monkeypatch, capsys):
    path = tmp_path / "tiny.gguf"
    write_synthetic("tiny", path, progress=False)
    assert cli.main(["inspect", str(path)]) == 0
    assert f"VRAM budget 8.00 GiB at -c {4096}" in capsys.readouterr().out
    monkeypatch.setattr(layout, "DEFAULT_PLAN_BUDGET", "1KiB")  # a default too small: a note, no error
    assert cli.main(["inspect", str(path)]) == 0
    assert "no slot plan: 1KiB (the default --vram-budget)" in capsys.readouterr().out
    assert cli.main(["inspect", str(path), "--vram-budget", "1KiB"]) == 2  # asked for: an error


def test_the_train_and_test_extras_agree_on_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch = [spec for spec in extras["train"] if spec.startswith("torch")]
    assert len(torch) == 1 and "edge-preattn[train]" in extras["test"]  # test installs train's torch
    assert not [spec for spec in extras["test"] if spec.startswith("torch")]
