"""The ``kitsnet`` command line itself: version, usage, help texts and the defaults they show."""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types

import pytest

import kitsnet
from kitsnet import cli
from kitsnet.cli import build_parser, main


def commands() -> dict[str, argparse.ArgumentParser]:
    """Each sub-command's parser, by name."""
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help line as ``--help`` shows it (``%(default)s`` filled in), unwrapped."""
    return action.help % {**vars(action), "prog": parser.prog}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"kitsnet {kitsnet.__version__}\n"


def test_bare_kitsnet_prints_usage_and_the_commands(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: kitsnet")
    for name in ("synth", "validate", "predict", "fetch", "evaluate"):
        assert re.search(rf"^\s+{name}\s+\w", captured.err, re.M), name


def test_every_option_of_every_command_has_help_and_shows_its_default():
    found = commands()
    assert set(found) == {"synth", "validate", "predict", "fetch", "evaluate"}
    for name, parser in found.items():
        for action in parser._actions:
            what = f"kitsnet {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{what}: no help"
            shows_default = action.default is not None and action.nargs != 0  # not flags, -h
            if shows_default and not action.required:
                assert "(default: " in expanded_help(parser, action), f"{what}: no default"


def test_the_module_docstring_lists_every_command_with_its_real_defaults():
    found = commands()
    command = None
    for line in cli.__doc__.splitlines():
        if line.startswith("kitsnet ") and not line.startswith("kitsnet --"):
            command = line.split()[1]
            assert command in found, line
        elif not line.startswith(" "):
            command = None
        if command is None:
            continue
        for option, value in re.findall(r"\[--([\w-]+) ([^\]|]+)\]", line):
            if value.isupper():  # a metavar, not a value
                continue
            default = found[command].get_default(option.replace("-", "_"))
            assert str(default) == value or default == type(default)(value), (line, option)
    for name in found:
        assert f"kitsnet {name} " in cli.__doc__


def test_predict_runs_the_best_model_unless_one_is_named(monkeypatch, tmp_path, capsys):
    used: dict = {}

    def predict_best(input_path, out, **kwargs):
        used.update(kwargs)
        return []

    # a stand-in for kitsnet.postprocess.predict_best, so the test needs no torch
    fake = types.SimpleNamespace(predict_best=predict_best)
    monkeypatch.setitem(sys.modules, "kitsnet.postprocess.predict_best", fake)
    argv = ["predict", "--input", str(tmp_path), "--out", "o"]
    assert main(argv) == 0
    assert used["model"] is None  # None: results/best_configuration.json
    assert used["postprocessing"] is True and used["save_probs"] is False
    assert used["inference"] == {}  # the workflow's settings, from best_configuration.json
    assert main([*argv, "--step-size", "0.25", "--no-mirror"]) == 0
    assert used["inference"] == {"step_size": 0.25, "mirror": False}
    assert main([*argv, "--config", "3d_fullres"]) == 0 and used["model"] == "3d_fullres"
    assert main([*argv, "--model", "2d+3d_fullres", "--folds", "0", "2"]) == 0
    assert used["model"] == "2d+3d_fullres" and used["folds"] == [0, 2]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"(default: {used['checkpoint']})" in shown and f"(default: {used['device']})" in shown
    assert "best_configuration.json" in shown


def test_fetch_defaults_shown_are_those_of_the_library(monkeypatch, tmp_path):
    from kitsnet.data import fetch as fetch_module

    library = inspect.signature(fetch_module.fetch)
    used: dict = {}

    def fake_fetch(dataset, out, **kwargs):
        used.update(kwargs)
        return fetch_module.FetchSummary(dataset, out)

    monkeypatch.setattr(fetch_module, "fetch", fake_fetch)
    assert main(["fetch", "kits21", "--out", str(tmp_path)]) == 0
    for key in ("base_url", "jobs", "retries", "timeout"):
        assert used[key] == library.parameters[key].default, key
    parser = commands()["fetch"]
    for action in parser._actions:
        if action.dest in ("base_url", "jobs", "retries", "timeout"):
            assert f"(default: {used[action.dest]})" in expanded_help(parser, action)
