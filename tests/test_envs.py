"""Per-step conda environments, rule directives and the SLURM profile, checked statically.

The environments are not built here (conda's channels are out of reach of CI); what is checked
is that every rule runs in one of them, that every one is pinned to exact versions, and that
those versions agree with the pins and ranges of pyproject.toml.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))
HEAVY = {"train", "predict", "predict_lowres", "preprocess", "crop_roi", "evaluate", "fingerprint"}


def _rules() -> dict[str, str]:
    """Rule name -> its block of text, from rules/*.smk and the Snakefile."""
    blocks = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        text = path.read_text()
        starts = list(re.finditer(r"^(\s*)rule (\w+):", text, flags=re.M))
        for m, nxt in zip(starts, [*starts[1:], None], strict=False):
            blocks[m.group(2)] = text[m.start() : nxt.start() if nxt else len(text)]
    return blocks


def _env_pins(path: Path) -> dict[str, str]:
    """Package -> exact version of one environment (conda 'name=ver' and pip 'name==ver')."""
    env = yaml.safe_load(path.read_text())
    pins = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for req in dep["pip"]:
                if req.startswith("kitsnet"):
                    pins["kitsnet"] = _kitsnet_tag(path, req)
                    continue
                m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][0-9A-Za-z.+]*)", req)
                assert m, f"{path.name}: pip requirement {req!r} is not pinned with =="
                pins[canonicalize_name(m.group(1))] = m.group(2)
        else:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)=([0-9][0-9A-Za-z.]*)", dep)
            assert m, f"{path.name}: conda dependency {dep!r} is not pinned with ="
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _kitsnet_tag(path: Path, line: str) -> str:
    """The version a step environment installs kitsnet at: it must be the workflow's own
    repository at the tag of pyproject.toml's version (what a module deployment of that tag
    runs), not a checkout on sys.path."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    req = Requirement(line)
    version = meta["version"]
    assert req.url == f"git+{meta['urls']['Repository']}@v{version}", f"{path.name}: {line}"
    return version


def _pyproject() -> tuple[dict[str, SpecifierSet], SpecifierSet]:
    """Every requirement of the package and its extras (not the extras' self-references)."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = {}
    extras = [line for lines in meta["optional-dependencies"].values() for line in lines]
    for line in [*meta["dependencies"], *extras]:
        req = Requirement(line)
        if canonicalize_name(req.name) != "kitsnet":
            deps[canonicalize_name(req.name)] = req.specifier
    return deps, SpecifierSet(meta["requires-python"])


def test_every_rule_has_an_environment_a_log_and_heavy_ones_a_benchmark():
    rules = _rules()
    assert {"train", "predict", "evaluate", "table1", "compute_cost"} <= set(rules)
    for name, block in rules.items():
        if name == "all":
            continue
        assert re.search(r"^\s+log:", block, flags=re.M), f"rule {name} has no log:"
        env = re.search(r"^\s+conda:\s*\n\s+\"\.\./(envs/[\w.]+\.yaml)\"", block, flags=re.M)
        assert env, f"rule {name} has no conda: environment under envs/"
        assert (REPO / env.group(1)).is_file(), f"rule {name}: {env.group(1)} is missing"
        if name in HEAVY:
            assert re.search(r"^\s+benchmark:", block, flags=re.M), f"rule {name}: no benchmark"


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_environment_is_pinned_and_agrees_with_pyproject(env):
    pins = _env_pins(env)
    deps, python = _pyproject()
    assert "python" in pins and "pip" in pins
    assert Version(pins["python"]) in python, f"python {pins['python']} vs {python}"
    for name, version in pins.items():
        if name in deps:
            assert deps[name].contains(version, prereleases=False), (
                f"{env.name}: {name}=={version} does not satisfy pyproject.toml's {deps[name]}"
            )
    exact = {n: str(s).removeprefix("==") for n, s in deps.items() if str(s).startswith("==")}
    for name in set(pins) & set(exact):
        assert pins[name] == exact[name], f"{env.name}: {name} {pins[name]} != {exact[name]}"


def test_every_environment_installs_kitsnet_from_the_workflows_release_tag():
    for env in ENVS:
        assert _env_pins(env).get("kitsnet"), f"{env.name} does not install kitsnet"
    assert "kitsnet[torch] @ git+" in (REPO / "envs" / "torch.yaml").read_text()


def test_workflow_code_never_puts_a_checkout_on_sys_path():
    """A module deployment has no checkout: kitsnet must come from the installed package."""
    files = [REPO / "Snakefile", *(REPO / "rules").glob("*.smk")]
    files += (REPO / "workflow_scripts").glob("*.py")
    path_edit = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=|PYTHONPATH")
    offenders = [f.name for f in files if path_edit.search(f.read_text())]
    assert offenders == []


def test_environments_agree_with_each_other_and_cover_the_steps():
    versions: dict[str, set[str]] = {}
    for env in ENVS:
        for name, version in _env_pins(env).items():
            versions.setdefault(name, set()).add(version)
    assert {n: v for n, v in versions.items() if len(v) > 1} == {}
    names = {p.stem for p in ENVS}
    assert {"torch", "evaluate", "report"} <= names
    assert "torch" in _env_pins(REPO / "envs" / "torch.yaml")
    assert "surface-distance" in _env_pins(REPO / "envs" / "evaluate.yaml")
    assert "matplotlib" in _env_pins(REPO / "envs" / "report.yaml")


def test_slurm_profile_is_commented_sets_the_paper_preset_and_batches_preprocessing():
    text = (REPO / "slurm" / "config.yaml").read_text()
    lines = text.splitlines()
    # every top-level entry has a comment right above it (or a comment block that leads to it)
    for i, line in enumerate(lines):
        if re.match(r"^[\w\-]+:", line):
            assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"uncommented: {line}"
    profile = yaml.safe_load(text)
    assert profile["executor"] == "slurm"
    # the paper's settings as a config key (an extra --configfile layers on it, not replaces it)
    assert profile["config"] == ["preset=paper"] and "configfile" not in profile
    assert profile["retries"] >= 1 and profile["jobs"] >= 20
    # GPU counts come from the rules' resources only, not from the profile
    assert not any("gpu" in r for r in profile.get("set-resources", {}).values())
    assert profile["groups"] == [
        "preprocess=preprocessing",
        "crop_roi=roi_crops",
        "evaluate=evaluation",
    ]
    assert "gpu_model" in text  # left for the user, commented


def test_report_dependencies_come_with_a_plain_install_and_the_report_env():
    """`snakemake --report` needs pygments, which snakemake does not depend on: it must come
    with the README's install, `pip install -e '.[workflow]'` (not only with the test extra,
    where pytest brings it)."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = meta["optional-dependencies"]["workflow"]
    workflow = {canonicalize_name(Requirement(r).name) for r in extra}
    assert "pygments" in workflow and "snakemake" in workflow
    assert "pip install -e '.[workflow]' && snakemake --cores 2" in (REPO / "README.md").read_text()
    assert "pygments" in _env_pins(REPO / "envs" / "report.yaml")
