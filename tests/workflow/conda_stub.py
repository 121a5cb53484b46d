"""A stand-in for the `conda` command, for tests/workflow/test_envs.py: conda's channels are out of
reach
here, so the conda part of a step environment (python, pip) cannot be built.  This builds its
pip part for real, and answers the few other commands Snakemake 9.27 runs (deployment/conda.py):

- ``conda info --json``, ``conda --version``, ``conda config --get channel_priority --json``:
  what Snakemake checks before it creates an environment;
- ``conda env create --file ENV.yaml --prefix PREFIX``: a fresh virtual environment of the
  interpreter that runs the tests (in place of the file's ``python=``; the ``pip=`` of the file
  is this venv's pip, linked), then the file's ``pip:`` requirements installed by pip into it,
  offline (``--no-index``).  The packages the requirements name, and what they depend on, are
  linked from the test venv's site-packages where its version matches the pin, so that pip finds
  them satisfied (nothing is downloaded, torch included).  A pin the test venv does not satisfy
  stops the creation, naming it.  Nothing else from the test venv is visible in the environment.
- ``<prefix>/bin/activate ENV`` (sourced by Snakemake's jobs and post-deploy scripts) puts the
  environment's bin/ first on PATH, so its ``python`` runs the scripts.

A probe (a .pth file) in every environment records, for each Python script it runs, the
interpreter, where kitsnet came from, and the top-level modules imported from the test venv
instead of the environment (Snakemake's script preamble appends the driver's sys.path, so a
package missing from an environment would silently come from there):
``<prefix>/probe.jsonl``; the creation's report is ``<prefix>/stub-report.json``.
"""

from __future__ import annotations

import json
import os
import platform
import site
import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
VERSION = "24.11.0"  # >= Snakemake 9.27's MIN_CONDA_VER
SITE = Path(sysconfig.get_paths()["purelib"])

PROBE = """\
import atexit, importlib.machinery, json, os, sys

_OUTSIDE = {outside!r}
_ALLOWED = set({allowed!r})
_BLOCKED = set()


def _outside(entry):
    # not resolved: the environment's packages are links into the test venv
    entry = os.path.abspath(entry or ".")
    return any(entry == root or entry.startswith(root + os.sep) for root in _OUTSIDE)


_FILE_FINDER = importlib.machinery.FileFinder.path_hook(
    (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
    (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
)


class _EnvironmentOnly:
    \"\"\"The finder of a folder of the test venv on sys.path (Snakemake's script preamble
    appends the driver's sys.path): it finds Snakemake and its dependencies, which the preamble
    itself needs, and nothing else, as if the package were not installed (what a package
    missing from an environment built by conda would be, where the driver's Python differs).\"\"\"

    def __init__(self, path):
        self._finder = _FILE_FINDER(path)

    def find_spec(self, fullname, target=None):
        spec = self._finder.find_spec(fullname, target)
        top = fullname.partition(".")[0]
        if spec is None or top in _ALLOWED:
            return spec
        if spec.loader is not None:  # not a portion of a namespace package the env also has
            _BLOCKED.add(top)
        return None

    def invalidate_caches(self):
        self._finder.invalidate_caches()


def _hook(path):
    if not _outside(path):
        raise ImportError(path)
    return _EnvironmentOnly(path)


sys.path_hooks.insert(0, _hook)
sys.path_importer_cache.clear()


def _record():
    script = sys.argv[0] if sys.argv else ""
    if not script.endswith(".py"):
        return
    outside = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if path and _outside(os.path.dirname(path)):
            outside.add(name.partition(".")[0])
    kitsnet = sys.modules.get("kitsnet")
    record = {{
        "script": os.path.basename(script),
        "executable": sys.executable,
        "prefix": sys.prefix,
        "kitsnet": getattr(kitsnet, "__file__", None),
        "outside": sorted(outside),
        "blocked": sorted(_BLOCKED),
    }}
    with open(os.path.join(sys.prefix, "probe.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\\n")


atexit.register(_record)
"""

ACTIVATE = """\
# stub of conda's activate: `source activate PREFIX`
export CONDA_PREFIX="$1"
export PATH="$1/bin:$PATH"
unset PYTHONHOME
"""


def installed() -> dict:
    return {canonicalize_name(d.metadata["Name"]): d for d in distributions(path=[str(SITE)])}


def closure(names: list[tuple[str, set[str]]], dists: dict) -> tuple[set[str], list[str]]:
    """The distributions ``names`` need (themselves and what they require, markers evaluated
    here), and the requirements the test venv lacks."""
    todo, seen, missing = list(names), set(), []
    while todo:
        name, extras = todo.pop()
        key = (name, tuple(sorted(extras)))
        if key in seen:
            continue
        seen.add(key)
        dist = dists.get(name)
        if dist is None:
            missing.append(name)
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            marker: Marker | None = req.marker
            if marker and not any(marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            todo.append((canonicalize_name(req.name), set(req.extras)))
    return {name for name, _ in seen if name in dists}, missing


def top_levels(dist) -> set[str]:
    """The entries of site-packages a distribution installed (packages, modules, .libs folders,
    .pth files, its .dist-info)."""
    entries = set()
    for path in dist.files or []:
        if path.parts and path.parts[0] not in ("..", "__pycache__"):
            entries.add(path.parts[0])
    return entries


def create(env_file: Path, prefix: Path) -> None:
    spec = yaml.safe_load(env_file.read_text())
    conda_part, pins = {}, []
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            pins += dep.get("pip", [])
        else:
            name, _, version = dep.partition("=")
            conda_part[name] = version
    dists = installed()
    report: dict = {"env_file": str(env_file), "pins": pins, "mismatches": [], "linked": []}
    # the conda part, not built: python is the test venv's interpreter, pip its pip
    report["conda_part"] = {
        "python": {"pinned": conda_part.get("python"), "used": platform.python_version()},
        "pip": {"pinned": conda_part.get("pip"), "used": dists["pip"].version},
    }
    wanted = [("pip", set())]
    for line in pins:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        dist = dists.get(name)
        if dist is None or not req.specifier.contains(dist.version, prereleases=True):
            report["mismatches"].append(f"{line} (test venv: {dist.version if dist else 'none'})")
        wanted.append((name, set(req.extras)))
    needed, missing = closure(wanted, dists)
    report["missing"] = sorted(missing)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    env_site = prefix / "lib" / f"python{sysconfig.get_python_version()}" / "site-packages"
    for name in sorted(needed):
        for entry in sorted(top_levels(dists[name])):
            target = env_site / entry
            if not target.exists() and (SITE / entry).exists():
                target.symlink_to(SITE / entry)
        report["linked"].append(f"{name}=={dists[name].version}")
    roots = (SITE, *site.getsitepackages())
    outside = sorted({os.path.abspath(p) for p in roots} | {os.path.realpath(p) for p in roots})
    snakemake_closure, _ = closure([("snakemake", set())], dists)
    allowed = sorted(
        {entry.removesuffix(".py") for n in snakemake_closure for entry in top_levels(dists[n])}
    )
    probe = PROBE.format(outside=outside, allowed=allowed)
    (env_site / "_kitsnet_env_probe.py").write_text(probe)
    (env_site / "_kitsnet_env_probe.pth").write_text("import _kitsnet_env_probe\n")
    (prefix / "stub-report.json").write_text(json.dumps(report, indent=1))
    if report["mismatches"] or missing:
        sys.exit(
            f"conda stub: {env_file.name}: the test venv does not satisfy these pins "
            f"{report['mismatches']} / lacks {missing}; nothing is downloaded"
        )
    if pins:
        # what conda does with the pip: section; here every requirement is already satisfied
        # (pip checks their dependencies too), so pip installs nothing and needs no index
        cmd = [str(prefix / "bin" / "python"), "-m", "pip", "install", "--no-index"]
        cmd += ["--no-cache-dir", "--disable-pip-version-check", *pins]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        report["pip_install"] = proc.stdout[-3000:] + proc.stderr[-3000:]
        (prefix / "stub-report.json").write_text(json.dumps(report, indent=1))
        if proc.returncode != 0:
            sys.exit(f"conda stub: pip install of {env_file.name}'s pins failed:\n{proc.stderr}")


def main(argv: list[str]) -> None:
    prefix_root = Path(os.environ["CONDA_STUB_PREFIX"])
    with open(prefix_root / "calls.log", "a") as fh:
        fh.write(" ".join(argv) + "\n")
    if argv[:2] == ["info", "--json"]:
        info = {"conda_prefix": str(prefix_root), "root_prefix": str(prefix_root)}
        print(json.dumps({**info, "platform": "linux-64", "conda_version": VERSION}))
    elif argv[:1] == ["--version"]:
        print(f"conda {VERSION}")
    elif argv[:1] == ["config"]:
        print(json.dumps({"get": {"channel_priority": "strict"}, "rc_path": ""}))
    elif argv[:2] == ["env", "create"]:
        args = iter(argv[2:])
        opts = {}
        for arg in args:
            if arg in ("--file", "--prefix", "-f", "-p"):
                opts[arg.lstrip("-")[0]] = next(args)
        create(Path(opts["f"]), Path(opts["p"]))
    elif argv[:1] == ["clean"]:
        pass
    else:
        sys.exit(f"conda stub: unsupported command {argv}")


def install(prefix_root: Path) -> Path:
    """A fake conda installation at ``prefix_root``; returns its bin/ (put it first on PATH)."""
    bindir = prefix_root / "bin"
    bindir.mkdir(parents=True)
    conda = bindir / "conda"
    conda.write_text(
        f'#!/bin/sh\nCONDA_STUB_PREFIX="{prefix_root}" exec "{sys.executable}" '
        f'"{Path(__file__).resolve()}" "$@"\n'
    )
    conda.chmod(0o755)
    (bindir / "activate").write_text(ACTIVATE)
    return bindir


if __name__ == "__main__":
    main(sys.argv[1:])
