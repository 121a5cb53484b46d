"""kitsnet's own source in the workflow's step environments: its fingerprint, a wheel of it, the
environment files Snakemake builds from it, and the check that a job imports the workflow's code.

Under ``--use-conda`` every rule runs in a step environment (``envs/{torch,evaluate,report}.yaml``).
Those files pin third-party packages only: kitsnet comes from the workflow's own source, the
one that runs, local edits included, never from a package index or a repository URL.
``rules/common.smk`` does, at parse time, with the functions here:

1. read the source of kitsnet (:func:`read_package`: every file of the package but bytecode) and
   fingerprint it (:func:`fingerprint`, SHA-256 of the paths and bytes);
2. write a wheel of exactly those files (:func:`wheel`: a pure-Python wheel made with the
   standard library, so building it needs neither setuptools nor a network) under
   ``.snakemake/kitsnet/<fingerprint>/``;
3. write a copy of each environment file there, with a post-deploy script beside it
   (:func:`write_step_environment`) that pip-installs the wheel into the new environment,
   ``--no-deps --no-index``, and checks the import.  Snakemake 9.27 hashes an environment
   file's content together with its ``<name>.post-deploy.sh`` (``deployment/conda.py``,
   ``Env._get_hash``); both name the fingerprint, so other kitsnet code means another hash,
   hence another environment (``.snakemake/conda/<hash>``), built on the next run.  The rules'
   ``conda:`` is that copy (``step_env(name)``).
4. export the fingerprint as ``KITSNET_WORKFLOW_SOURCE`` to the jobs; ``import kitsnet`` in a job
   then compares it with its own files (:func:`check_environment`) and stops, naming the
   environment and how to rebuild it, when they differ (an environment edited by hand, or a
   job that fell back to another kitsnet on ``sys.path``).

Only the standard library here: :func:`check_environment` runs on every ``import kitsnet``
in a job, before numpy is imported.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import uuid
import zipfile
from pathlib import Path

ENV_VAR = "KITSNET_WORKFLOW_SOURCE"
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")
# a fixed date for every member, so the same source gives the same wheel bytes
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class SourceMismatchError(RuntimeError):
    """The kitsnet a job imports is not the source the workflow was started with."""


def read_package(package_dir: str | os.PathLike) -> list[tuple[str, bytes]]:
    """``(kitsnet/<relative path>, bytes)`` of every file of the package in ``package_dir``,
    bytecode caches aside, sorted by path."""
    root = Path(package_dir)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(_SKIP_SUFFIXES):
                continue
            path = Path(dirpath) / name
            files.append((f"kitsnet/{path.relative_to(root).as_posix()}", path.read_bytes()))
    return sorted(files)


def fingerprint(files: list[tuple[str, bytes]]) -> str:
    """SHA-256 of the package's paths and contents (:func:`read_package`)."""
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def package_fingerprint(package_dir: str | os.PathLike) -> str:
    return fingerprint(read_package(package_dir))


def _requirement_with_extra(req: str, extra: str) -> str:
    base, _, marker = req.partition(";")
    condition = f'extra == "{extra}"'
    if marker.strip():
        condition = f"({marker.strip()}) and {condition}"
    return f"{base.strip()}; {condition}"


def wheel(files: list[tuple[str, bytes]], project: dict) -> tuple[str, bytes]:
    """A pure-Python wheel (file name, bytes) holding ``files`` with the metadata of
    pyproject.toml's ``[project]`` table: what ``pip wheel`` of the source would give for this
    package (setuptools finds the one package ``kitsnet*`` and no data files beyond it)."""
    name, version = project["name"], project["version"]
    dist = f"{name}-{version}.dist-info"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    if project.get("description"):
        meta.append(f"Summary: {project['description']}")
    if project.get("requires-python"):
        meta.append(f"Requires-Python: {project['requires-python']}")
    meta += [f"Requires-Dist: {req}" for req in project.get("dependencies", [])]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        meta.append(f"Provides-Extra: {extra}")
        meta += [f"Requires-Dist: {_requirement_with_extra(r, extra)}" for r in reqs]
    members = list(files)
    members.append((f"{dist}/METADATA", ("\n".join(meta) + "\n").encode()))
    wheel_info = "Wheel-Version: 1.0\nGenerator: kitsnet.core.source\nRoot-Is-Purelib: true\n"
    members.append((f"{dist}/WHEEL", (wheel_info + "Tag: py3-none-any\n").encode()))
    scripts = project.get("scripts", {})
    if scripts:
        lines = "".join(f"{k} = {v}\n" for k, v in scripts.items())
        members.append((f"{dist}/entry_points.txt", f"[console_scripts]\n{lines}".encode()))
    record = []
    for member, data in members:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{member},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    members.append((f"{dist}/RECORD", ("\n".join(record) + "\n").encode()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in members:
            info = zipfile.ZipInfo(member, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return f"{name}-{version}-py3-none-any.whl", buffer.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write atomically, and only when the content differs (jobs of a cluster run parse the
    workflow at the same time, on a shared filesystem)."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


POST_DEPLOY = """\
#!/bin/sh
# Generated by rules/common.smk (kitsnet.core.source) for envs/{name}.yaml; Snakemake runs it inside
# the new environment.  It installs this workflow's own kitsnet, from {origin},
# source fingerprint {fp},
# from the wheel below: offline, without dependencies (the environment file pins them).
# Snakemake hashes this script with the environment file, so other kitsnet code gives another
# environment.
set -eu
python -m pip install --no-deps --no-index --force-reinstall --no-cache-dir \\
    --disable-pip-version-check --quiet '{wheel}'
{env_var}={fp} python -c 'import kitsnet'
"""


def write_step_environment(
    dest: str | os.PathLike,
    name: str,
    env_yaml: str,
    wheel_path: str | os.PathLike,
    fp: str,
    origin: str,
) -> Path:
    """Write ``<dest>/<name>.yaml`` (``env_yaml``, the third-party pins of ``envs/<name>.yaml``,
    under a header naming the source fingerprint) and ``<dest>/<name>.post-deploy.sh`` (installs
    the wheel); return the environment file's absolute path, for a rule's ``conda:``."""
    dest = Path(dest).absolute()
    header = (
        f"# Generated by rules/common.smk from envs/{name}.yaml, for kitsnet source {fp}\n"
        f"# ({origin}); {name}.post-deploy.sh installs that kitsnet.  Do not edit.\n"
    )
    env_file = dest / f"{name}.yaml"
    _write_if_changed(env_file, (header + env_yaml).encode())
    script = POST_DEPLOY.format(
        name=name, fp=fp, origin=origin, wheel=Path(wheel_path).absolute(), env_var=ENV_VAR
    )
    deploy = dest / f"{name}.post-deploy.sh"
    _write_if_changed(deploy, script.encode())
    return env_file


def write_wheel(dest: str | os.PathLike, files: list[tuple[str, bytes]], project: dict) -> Path:
    filename, data = wheel(files, project)
    path = Path(dest).absolute() / filename
    _write_if_changed(path, data)
    return path


def check_environment() -> None:
    """In a workflow job (``KITSNET_WORKFLOW_SOURCE`` set): stop unless this kitsnet's files
    are the source the workflow was started with."""
    wanted = os.environ.get(ENV_VAR)
    if not wanted:
        return
    here = Path(__file__).resolve().parents[1]  # the kitsnet package (this is kitsnet/core/)
    found = package_fingerprint(here)
    if found == wanted:
        return
    raise SourceMismatchError(
        f"this job's kitsnet ({here}, in the environment {sys.prefix}) is not the workflow's: "
        f"its source fingerprint is {found[:16]}, the workflow's kitsnet is {wanted[:16]}.  "
        "The environment holds other kitsnet code than the workflow that runs it (edited by "
        "hand, or built by another version of the workflow).  Rebuild it: delete "
        f"{sys.prefix} (or run `snakemake --use-conda --conda-cleanup-envs` with the same "
        "targets and settings) and run again with --use-conda, which installs kitsnet from "
        "the workflow's own source (.snakemake/kitsnet/)."
    )
