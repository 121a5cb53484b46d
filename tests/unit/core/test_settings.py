"""kitsnet.core.settings on plain data: the lines a config mistake is answered with (the nearest
valid
key, what a value should be, the file or flag that set it), the message for a missing data_root,
and the per-job requests fitted to the run.  Pure function calls, no Snakemake: the subprocess
tests (test_config_errors.py, test_workstation.py) check the same messages end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from kitsnet.core.settings import (
    ConfigError,
    assemble_settings,
    check_settings,
    choose_preset,
    config_problems,
    fit_resources,
    layer,
    missing_data_root,
    resolve_data_root,
    setting_origin,
    shown_path,
)

SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
PAPER = yaml.safe_load((REPO / "config" / "kits21.yaml").read_text())


def _problems(user: dict, source: str = "--config") -> list[str]:
    """The problem lines of the demo preset with ``user``'s settings on top, all set by
    ``source``."""
    settings = assemble_settings("demo", [copy.deepcopy(DEMO)], user)
    return config_problems(settings, SCHEMA, origin=lambda keys: source)


def test_both_presets_as_shipped_have_no_problems():
    for preset, files in (("demo", [DEMO]), ("paper", [DEMO, PAPER])):
        settings = assemble_settings(preset, copy.deepcopy(files), {})
        assert config_problems(settings, SCHEMA, origin=str) == []


@pytest.mark.parametrize(
    "user, line",
    [
        (
            {"training": {"epochz": 3}},
            "training.epochz: unknown key; did you mean 'epochs'? (--configfile typo.yaml)",
        ),
        # a key of a section, given at the top level: named with its section
        (
            {"epochz": 3},
            "epochz: unknown key; did you mean 'training.epochs'? (--configfile typo.yaml)",
        ),
    ],
)
def test_an_unknown_key_is_answered_with_the_nearest_valid_one(user, line):
    assert _problems(user, "--configfile typo.yaml") == [line]


@pytest.mark.parametrize(
    "user, line",
    [
        ({"seed": -1}, "seed: -1 is not valid; expected an integer >= 0 (--config)"),
        ({"folds": "two"}, "folds: 'two' is not valid; expected an integer >= 2 (--config)"),
        (
            {"training": {"momentum": 2}},
            "training.momentum: 2 is not valid; expected a number in [0, 1] (--config)",
        ),
        (
            {"synthetic": {"cases": 1, "seed": 0}},
            "synthetic.cases: 1 is not valid; expected an integer >= 2 (--config)",
        ),
        (
            {"fetch_imaging": "true"},
            "fetch_imaging: 'true' is not valid; expected true or false; "
            "write --config fetch_imaging=True (--config)",
        ),
    ],
)
def test_a_wrong_value_is_answered_with_what_is_expected(user, line):
    assert _problems(user) == [line]


def test_a_misspelt_word_gets_the_nearest_allowed_one():
    (line,) = _problems({"configurations": ["3d_fullress"]})
    assert line.startswith("configurations[0]: '3d_fullress' is not valid; expected one of '2d',")
    assert line.endswith("; did you mean '3d_fullres'? (--config)")


def test_a_config_error_shows_six_problems_and_counts_the_rest():
    settings = assemble_settings("demo", [copy.deepcopy(DEMO)], {"seed": -1})
    with pytest.raises(ConfigError, match=r"^1 problem in the config, so nothing was run"):
        check_settings(settings, SCHEMA, str, "config/schema.yaml")
    settings.update({f"typo{i}": i for i in range(8)})
    with pytest.raises(ConfigError) as err:
        check_settings(settings, SCHEMA, str, "config/schema.yaml")
    lines = str(err.value).splitlines()
    assert lines[0].startswith("9 problems in the config")
    assert len(lines) == 1 + 6 + 1 and lines[-1] == "  ... and 3 more"


def test_presets_layer_like_snakemakes_update_config():
    update_config = pytest.importorskip("snakemake.utils").update_config
    base = {"a": {"b": 1, "c": [1]}, "n": None, "s": {"x": 1}}
    top = {"a": {"c": [2], "d": {"e": 3}}, "n": {}, "s": 5, "t": {"u": None}}
    theirs = copy.deepcopy(base)
    ours = layer(base, top)
    update_config(theirs, top)
    assert ours == theirs
    assert base == {"a": {"b": 1, "c": [1]}, "n": None, "s": {"x": 1}}  # not modified


def test_a_preset_is_checked_and_the_key_that_set_a_value_is_named():
    assert choose_preset({}, ["demo", "paper"]) == "demo"
    with pytest.raises(ConfigError, match=r"^preset: 'papr' is not one of demo, paper; did you"):
        choose_preset({"preset": "papr"}, ["demo", "paper"])
    user = [("--configfile my.yaml", {"training": {"epochs": 3}}), ("--config", {"seed": 1})]
    files = [
        ("config/config.yaml", {"configurations": ["2d"], "data_root": "results/data/demo"}),
        ("config/kits21.yaml", {"data_root": "kits21/kits21/data"}),
    ]
    assert setting_origin(["training", "epochs"], user, "paper", files) == "--configfile my.yaml"
    assert setting_origin(["data_root"], user, "paper", files) == "preset paper, config/kits21.yaml"
    # list indices are not keys: the list was set as a whole
    assert setting_origin(["configurations", 0], user, "paper", files) == (
        "preset paper, config/config.yaml"
    )
    assert setting_origin(["nothing"], user, "paper", files) == "preset paper"


def test_a_relative_data_root_is_read_from_the_launch_folder(tmp_path):
    assert resolve_data_root("kits21/./data", str(tmp_path), str) == str(tmp_path / "kits21/data")
    assert resolve_data_root("/abs//data", None, str) == "/abs/data"
    with pytest.raises(ConfigError, match=r"^data_root: 'data' \(--config\) is relative, and"):
        resolve_data_root("data", None, lambda keys: "--config")
    assert shown_path(tmp_path / "my.yaml", str(tmp_path)) == "my.yaml"
    assert shown_path("/elsewhere/my.yaml", str(tmp_path)) == "/elsewhere/my.yaml"


def test_a_missing_data_root_says_where_it_was_set_and_what_to_run():
    launch = "/home/me/work"
    root = f"{launch}/kits21/kits21/data"
    text = missing_data_root(
        root,
        {"data_root": "kits21/kits21/data", "preset": "paper"},
        "kits21",
        False,
        launch,
        lambda keys: "preset paper, config/kits21.yaml",
    )
    assert text.splitlines() == [
        f"data_root: '{root}' is missing or not a folder.",
        "It is data_root: kits21/kits21/data from preset paper, config/kits21.yaml, relative to "
        f"the folder snakemake was started in ({launch}).",
        f"To get kits21 there, in {launch}: git clone https://github.com/neheller/kits21 && "
        "kitsnet fetch kits21 --out kits21/kits21/data",
        "Data elsewhere: data_root: /path/to/kits21/data in your --configfile, or "
        "--config preset=paper data_root=/path/to/kits21/data",
    ]


@pytest.mark.parametrize(
    "root, dataset, fetch, wanted",
    [
        # a clone elsewhere: cloned there, then fetched into it
        (
            "/data/kits21/data",
            "kits21",
            False,
            "To get kits21 there: git clone https://github.com/neheller/kits21 /data && "
            "kitsnet fetch kits21 --out /data/kits21/data",
        ),
        # fetch_imaging: the workflow downloads the imaging itself
        (
            "/data/kits21/data",
            "kits21",
            True,
            "To get kits21 there: git clone https://github.com/neheller/kits21 /data "
            "(the workflow downloads the imaging: fetch_imaging: true)",
        ),
        # not a clone's data folder: the commands with a placeholder
        (
            "/data/mine",
            "kits23",
            False,
            "To get kits23: git clone https://github.com/neheller/kits23 DIR && kitsnet fetch "
            "kits23 --out DIR/dataset, then data_root: DIR/dataset",
        ),
    ],
)
def test_the_commands_for_a_missing_data_root_fit_where_it_is(root, dataset, fetch, wanted):
    settings = {"data_root": root, "preset": "paper"}
    lines = missing_data_root(root, settings, dataset, fetch, "/home/me", str).splitlines()
    assert lines[1] == f"It is data_root: {root} from ['data_root']."
    assert lines[2] == wanted


def test_requests_above_the_runs_memory_are_lowered_and_too_many_gpus_stop_the_run():
    settings = {"resources": {"train": {"mem_mb": 64000, "3d_lowres": {"mem_mb": 90000}}}}
    fit_resources(settings, {"mem_mb": 32000, "gpu": 1})
    resources = settings["resources"]
    assert resources["train"] == {"mem_mb": 32000, "3d_lowres": {"mem_mb": 32000}}
    assert resources["max_mem_mb"] == 32000
    # a step without mem_mb keeps the rules' defaults (at most 8000), which fit
    assert resources["predict"] == {}
    untouched = {"resources": {"train": {"mem_mb": 64000}}}
    fit_resources(untouched, {})
    assert untouched == {"resources": {"train": {"mem_mb": 64000}}}
    with pytest.raises(ConfigError, match=r"^resources\.train\.gpu: 1 GPU\(s\) per job, but this"):
        fit_resources({}, {"gpu": 0})
    with pytest.raises(ConfigError, match=r"^resources\.predict\.2d\.gpu: 2 GPU\(s\)"):
        fit_resources({"resources": {"predict": {"2d": {"gpu": 2}}}}, {"gpu": 1})


def test_settings_import_no_snakemake():
    """The library module stays importable without the workflow extra's Snakemake."""
    text = Path(REPO / "kitsnet" / "core" / "settings.py").read_text()
    assert "snakemake" not in [
        line.split()[1].split(".")[0]
        for line in text.splitlines()
        if line.startswith(("import ", "from "))
    ]
