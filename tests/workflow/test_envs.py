"""Per-step conda environments, rule directives and the SLURM profile.

Statically: every rule runs in one of the environments, every one is pinned to exact versions
that agree with the pins and ranges of pyproject.toml, and none lists kitsnet or names a
repository URL (kitsnet comes from the workflow's own source: rules/common.smk,
kitsnet/core/source.py).

Built (marked workflow): conda's channels are out of reach here, so the conda part of the
environments (python, pip) is not built; a stand-in for the conda command
(tests/workflow/conda_stub.py)
builds the pip part of each environment into a fresh virtual environment, offline, and real
Snakemake runs the micro config with --use-conda through it: the post-deploy scripts install
kitsnet from the clone, and every environment runs its rules' scripts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")

REPO = Path(__file__).resolve().parents[2]
ENVS = sorted((REPO / "envs").glob("*.yaml"))
HEAVY = {"train", "predict", "predict_lowres", "preprocess", "crop_roi", "evaluate", "fingerprint"}
HEAVY |= {"ensemble", "postprocess"}


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
                assert not req.startswith("kitsnet"), (
                    f"{path.name}: lists {req!r}: kitsnet comes from the workflow's source "
                    "(rules/common.smk, step_env)"
                )
                m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][0-9A-Za-z.+]*)", req)
                assert m, f"{path.name}: pip requirement {req!r} is not pinned with =="
                pins[canonicalize_name(m.group(1))] = m.group(2)
        else:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)=([0-9][0-9A-Za-z.]*)", dep)
            assert m, f"{path.name}: conda dependency {dep!r} is not pinned with ="
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


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
        env = re.search(r"^\s+conda:\s*\n\s+step_env\(\"(\w+)\"\)", block, flags=re.M)
        assert env, f"rule {name} has no conda: step_env(<one of envs/>)"
        assert (REPO / f"envs/{env.group(1)}.yaml").is_file(), f"rule {name}: {env.group(1)}"
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


URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://|git\+|github\.com|gitlab\.com|bitbucket\.org")


def test_no_environment_lists_kitsnet_or_names_a_repository_url():
    """kitsnet comes from the workflow's own source (step_env in rules/common.smk), not from a
    package index or a repository that may not exist; the files pin third-party packages only."""
    for env in ENVS:
        text = env.read_text()
        assert not URL.search(text), f"{env.name} names a URL: {URL.search(text).group(0)}"
        assert "kitsnet" not in _env_pins(env)
    # the install hint when kitsnet is missing or another version: a checkout, not a URL
    common = (REPO / "rules" / "common.smk").read_text()
    check = re.search(r"^def check_kitsnet_version\(\):\n(.*?)\n(?=\S)", common, re.M | re.S)
    assert check and not URL.search(check.group(1)), "check_kitsnet_version names a URL"
    assert "pip install -e '.[workflow]'" in check.group(1)


def _env_scripts() -> dict[str, set[str]]:
    """Environment name -> the scripts of the rules that run in it."""
    scripts: dict[str, set[str]] = {}
    for block in _rules().values():
        env = re.search(r"^\s+conda:\s*\n\s+step_env\(\"(\w+)\"\)", block, flags=re.M)
        script = re.search(r"^\s+script:\s*\n\s+\"\.\./workflow_scripts/(\w+\.py)\"", block, re.M)
        if env and script:
            scripts.setdefault(env.group(1), set()).add(script.group(1))
    return scripts


def test_step_environment_files_install_the_sources_wheel_and_change_with_the_code(tmp_path):
    """What rules/common.smk writes for a rule's conda: (kitsnet.core.source): a copy of the
    environment file and a post-deploy script that installs a wheel of the source offline; both
    name the source's fingerprint, which changes with any edit of kitsnet, so Snakemake's hash
    of the environment (file + post-deploy script) changes too."""
    from kitsnet.core import source

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    files = source.read_package(REPO / "kitsnet")
    assert any(name == "kitsnet/core/source.py" for name, _ in files)
    assert not any("__pycache__" in name or name.endswith(".pyc") for name, _ in files)

    def generate(files, dest):
        fp = source.fingerprint(files)
        wheel = source.write_wheel(dest, files, project)
        envs = {}
        for env in ENVS:
            path = source.write_step_environment(
                dest, env.stem, env.read_text(), wheel, fp, origin="test"
            )
            deploy = path.with_name(f"{env.stem}.post-deploy.sh")
            envs[env.stem] = (path.read_text(), deploy.read_text())
        return fp, wheel, envs

    fp, wheel, envs = generate(files, tmp_path / "a")
    for env in ENVS:
        text, deploy = envs[env.stem]
        assert text.endswith(env.read_text()) and fp in text
        assert f"'{wheel}'" in deploy and fp in deploy
        assert "--no-deps --no-index" in deploy and not URL.search(text + deploy)
    # the same source gives the same bytes (a rerun does not rebuild anything)
    fp2, wheel2, envs2 = generate(files, tmp_path / "b")
    assert fp2 == fp and wheel2.read_bytes() == wheel.read_bytes()
    # one edited line in one module: another fingerprint, other environment files
    edited = [(n, d + b"\n# edited\n" if n == "kitsnet/plan/planner.py" else d) for n, d in files]
    fp3, _, envs3 = generate(edited, tmp_path / "c")
    assert fp3 != fp
    assert all(envs3[name][0] != envs[name][0] for name in envs)
    assert all(envs3[name][1] != envs[name][1] for name in envs)
    # the wheel is what pip installs (offline, no build backend): the package's files exactly
    target = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--quiet",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert source.package_fingerprint(target / "kitsnet") == fp
    assert (target / f"kitsnet-{project['version']}.dist-info" / "METADATA").is_file()


def test_a_job_stops_when_its_kitsnet_is_not_the_workflows():
    """With KITSNET_WORKFLOW_SOURCE set (rules/common.smk, under --use-conda), `import kitsnet`
    checks its own files against the workflow's fingerprint."""
    from kitsnet.core import source

    fp = source.package_fingerprint(REPO / "kitsnet")
    env = {k: v for k, v in os.environ.items() if k != source.ENV_VAR}
    code = [sys.executable, "-c", "import kitsnet"]  # from REPO: its kitsnet/ comes first
    kw = {"cwd": REPO, "capture_output": True, "text": True}
    ok = subprocess.run(code, env={**env, source.ENV_VAR: fp}, **kw)
    assert ok.returncode == 0, ok.stderr
    proc = subprocess.run(code, env={**env, source.ENV_VAR: "0" * 64}, **kw)
    assert proc.returncode != 0
    assert "SourceMismatchError" in proc.stderr and "is not the workflow's" in proc.stderr
    assert sys.prefix in proc.stderr and "--conda-cleanup-envs" in proc.stderr


def _clone(dest: Path) -> Path:
    """The working tree's files (tracked and new, not ignored: local edits included), copied,
    so that a run sees one state of the source while others edit the checkout."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a Git checkout of the workflow")
    listing = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listing.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def _snakemake(workdir: Path, clone: Path, *args: str, path: str | None = None):
    """snakemake on the clone's Snakefile from ``workdir`` with the micro config (two folds of
    the 2d configuration).  Snakemake puts the folder of a local Snakefile first on sys.path, so
    the workflow imports the clone's kitsnet; ``path``: put first on PATH."""
    from kitsnet.core.source import ENV_VAR

    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if path:
        env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(clone / "Snakefile")]
    cmd += ["--configfile", str(clone / "tests/data/micro.yaml")]
    cmd += ["--config", "configurations=[2d]", "folds=2", *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)


@pytest.mark.workflow
def test_each_environment_builds_from_the_clone_and_runs_its_rules_scripts(tmp_path):
    """--use-conda for real, but for conda itself (tests/workflow/conda_stub.py: each environment's
    pip
    part in a fresh virtual environment; the pins link to the test venv's packages, kitsnet comes
    from the post-deploy script, offline).  The micro config, reduced to the 2d configuration on
    two folds, runs every step: every environment runs its rules' scripts with its own python and
    its own kitsnet, and imports nothing its file does not provide.  Then: an environment whose
    kitsnet was edited stops its job, and other kitsnet code gives other environments."""
    import conda_stub

    start = time.monotonic()
    clone = _clone(tmp_path / "clone")
    stub = conda_stub.install(tmp_path / "conda")
    workdir = tmp_path / "run"
    workdir.mkdir()
    proc = _snakemake(workdir, clone, "--use-conda", "--cores", "2", path=str(stub))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # the environments: the step_env copies of envs/*.yaml, one each
    from kitsnet.core.source import package_fingerprint

    fp = package_fingerprint(clone / "kitsnet")
    envs = {}
    for copy in (workdir / ".snakemake" / "conda").glob("*.yaml"):
        head = re.match(
            r"# Generated by .* from envs/(\w+)\.yaml, for kitsnet source (\w+)", copy.read_text()
        )
        assert head and head.group(2) == fp, copy.read_text()[:300]
        envs[head.group(1)] = copy.with_suffix("")
    assert sorted(envs) == sorted(p.stem for p in ENVS)
    site = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    # what Snakemake's script preamble may import from the driver's environment (it appends the
    # driver's sys.path): Snakemake and what it depends on, nothing a script imports itself
    dists = conda_stub.installed()
    closure, _ = conda_stub.closure([("snakemake", set())], dists)
    allowed = {e.removesuffix(".py") for n in closure for e in conda_stub.top_levels(dists[n])}
    expected = _env_scripts()
    not_run = {
        "fetch.py": "downloads real KiTS data",
        "crop_roi.py": "3d_cascade_roi only",
        "ensemble.py": "needs two configurations; this run has one",
    }
    report = []
    for name, prefix in sorted(envs.items()):
        stub_report = json.loads((prefix / "stub-report.json").read_text())
        assert stub_report["mismatches"] == [] and stub_report["missing"] == []
        report.append(f"{name}: conda part not built {stub_report['conda_part']}")
        records = [json.loads(line) for line in (prefix / "probe.jsonl").read_text().splitlines()]
        ran = {}
        for rec in records:
            m = re.fullmatch(r"tmp\w+\.(\w+\.py)", rec["script"])
            if m:
                ran.setdefault(m.group(1), []).append(rec)
        assert set(ran) == expected[name] - set(not_run), f"{name}: {sorted(ran)}"
        for script, recs in ran.items():
            for rec in recs:
                assert rec["executable"] == str(prefix / "bin" / "python"), (script, rec)
                assert rec["kitsnet"] == str(prefix / site / "kitsnet" / "__init__.py"), rec
                leaked = set(rec["outside"]) - allowed
                assert not leaked, f"{name}: {script} imported {leaked} from outside the env"
        # the environment's kitsnet is the clone's source, installed from the wheel
        check = subprocess.run(
            [
                str(prefix / "bin" / "python"),
                "-c",
                "import kitsnet, kitsnet.core.source as s, os; "
                "print(s.package_fingerprint(os.path.dirname(kitsnet.__file__)))",
            ],
            cwd=tmp_path,  # not the checkout: `python -c` imports from its folder first
            capture_output=True,
            text=True,
        )
        assert check.stdout.strip() == fp, check.stderr
        direct = next((prefix / site).glob("kitsnet-*.dist-info")) / "direct_url.json"
        assert str(workdir / ".snakemake" / "kitsnet") in json.loads(direct.read_text())["url"]
        # a package the environment does not pin is missing from it, not borrowed from the
        # driver's site-packages that Snakemake's script preamble appends to sys.path
        other = {"torch": "surface_distance", "evaluate": "torch", "report": "torch"}[name]
        code = f"import sys; sys.path.append({str(conda_stub.SITE)!r}); import {other}"
        missing = subprocess.run(
            [str(prefix / "bin" / "python"), "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr, name
        blocked = sorted({b for recs in ran.values() for rec in recs for b in rec["blocked"]})
        report.append(f"{name}: optional imports the environment lacks: {blocked}")
    print("\n".join(report), f"\nbuilt and ran in {time.monotonic() - start:.0f} s")

    # an environment that holds other kitsnet code than the workflow's: its job stops
    with open(envs["torch"] / site / "kitsnet" / "plan" / "planner.py", "a") as fh:
        fh.write("\n# edited inside the environment\n")
    rerun = _snakemake(
        workdir,
        clone,
        "--use-conda",
        "--cores",
        "1",
        "-R",
        "splits",
        "--",
        "results/dataset/splits.json",
        path=str(stub),
    )
    assert rerun.returncode != 0
    log = (workdir / "results/logs/splits/splits.log").read_text() + rerun.stderr + rerun.stdout
    assert "is not the workflow's" in log and str(envs["torch"]) in log
    assert "--conda-cleanup-envs" in log

    # other kitsnet code: other environments (Snakemake's own hash: --list-conda-envs)
    def locations(source):
        listing = _snakemake(workdir, source, "--use-conda", "--list-conda-envs", path=str(stub))
        assert listing.returncode == 0, listing.stderr[-3000:]
        rows = re.findall(r"^\S*/(\w+)\.yaml\s+(\S+)$", listing.stdout, flags=re.M)
        return {name: workdir / location for name, location in rows}

    assert locations(clone) == envs
    edited = _clone(tmp_path / "edited")
    with open(edited / "kitsnet" / "plan" / "planner.py", "a") as fh:
        fh.write("\n# edited in the checkout\n")
    others = locations(edited)
    assert sorted(others) == sorted(envs)
    assert all(others[name] != envs[name] for name in envs)


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
        "ensemble=selection",
        "postprocess=selection",
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


@pytest.mark.workflow
def test_a_module_deployment_with_use_conda_gets_the_installed_release_into_its_environments(
    tmp_path,
):
    """A deployment from a Git tag has no checkout: its environments get the kitsnet that runs
    the workflow (the installed release, whose version start-up checks); the data jobs run in
    the torch environment built through the conda stand-in."""
    import conda_stub
    import test_module

    import kitsnet
    from kitsnet.core.source import ENV_VAR, package_fingerprint

    release = test_module.tagged_release(tmp_path / "release", test_module.VERSION)
    dest = test_module.deploy(tmp_path, release, f"v{test_module.VERSION}")
    stub = conda_stub.install(tmp_path / "conda")
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["PATH"] = f"{stub}{os.pathsep}{env['PATH']}"
    cmd = [sys.executable, "-c", test_module.RUNNER, "-s", "workflow/Snakefile", "--use-conda"]
    cmd += ["--cores", "2", "--", "results/dataset/splits.json"]
    proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fp = package_fingerprint(Path(kitsnet.__file__).parent)
    (copy,) = (dest / ".snakemake" / "conda").glob("*.yaml")
    assert f"from envs/torch.yaml, for kitsnet source {fp}" in copy.read_text()
    records = (copy.with_suffix("") / "probe.jsonl").read_text()
    assert "splits.py" in records and str(copy.with_suffix("")) in records
    assert _git_status(release) == ""


def _git_status(repo: Path) -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=repo, capture_output=True, text=True
    ).stdout
