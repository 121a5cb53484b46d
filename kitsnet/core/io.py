"""NIfTI and file I/O with one axis convention and atomic writes.

Axis convention used everywhere in kitsnet: arrays are in **nibabel order** as KiTS21 stores
them, i.e. ``np.asanyarray(nib.load(p).dataobj)`` with shape ``(slices, rows, cols)``, and the
spacing is ``header.get_zooms()[:3]`` in that same order (slice thickness first).  Keeping array
and spacing in one order is the only thing that matters for resampling and surface distances;
SimpleITK reverses both, so we never mix readers inside one computation.

Every writer goes through :func:`atomic_path`: the file is written under a temporary name in the
destination folder and renamed into place, so a killed job never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "Volume",
    "KitsnetError",
    "atomic_path",
    "remove_stale_temporaries",
    "load_volume",
    "save_volume",
    "save_json",
    "load_json",
    "save_npz",
]


class KitsnetError(RuntimeError):
    """An error meant for a person: the message names the case, the file and the problem."""


@dataclass
class Volume:
    """A 3D array with its voxel spacing (mm) and the affine/header it was read with."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    header: nib.Nifti1Header | None = None


def _temporary_prefix(path: Path) -> str:
    return f".{path.name.split('.')[0]}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The suffix is kept (``.nii.gz``, ``.npz``...) so libraries that choose a format from the
    file name still do the right thing.  ``durable=True`` also flushes the file and the folder
    to disk (for checkpoints: whole after a power cut too, not only after a killed process).
    A process killed inside the block leaves only a hidden temporary (see
    :func:`remove_stale_temporaries`), never a partial ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        if durable:
            _fsync(tmp_path)
        os.replace(tmp_path, path)
        if durable:
            _fsync(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries that :func:`atomic_path` left for ``path`` in a killed process."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    suffix = "".join(path.suffixes)
    stale = [
        p
        for p in path.parent.iterdir()
        if p.name.startswith(_temporary_prefix(path)) and p.name.endswith(suffix) and p.is_file()
    ]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_volume(
    path: str | os.PathLike[str], case: str | None = None, verify: bool = False
) -> Volume:
    """Read a 3D NIfTI, raising :class:`KitsnetError` naming the case and file on failure.

    ``verify=True`` decompresses a ``.gz`` to its end first: nibabel stops reading once it has
    the voxels, so a stream cut after them (no CRC, no length) or a bad CRC shows only then.
    """
    path = Path(path)
    who = f"{case}: " if case else ""
    if not path.exists():
        raise KitsnetError(f"{who}{path}: file is missing")
    if not path.is_file():
        raise KitsnetError(f"{who}{path}: is not a file")
    raw = None
    if verify and path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error) as exc:
            raise KitsnetError(
                f"{who}{path}: truncated or corrupt gzip ({type(exc).__name__}: {exc})"
            ) from exc
    try:
        img = nib.Nifti1Image.from_bytes(raw) if raw is not None else nib.load(str(path))
        del raw
        array = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files
        raise KitsnetError(f"{who}{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    if array.ndim != 3:
        raise KitsnetError(f"{who}{path}: expected a 3D image, got shape {array.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(array=array, spacing=zooms, affine=img.affine.copy(), header=img.header.copy())


def save_volume(
    array: np.ndarray,
    path: str | os.PathLike[str],
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> None:
    """Write ``array`` as NIfTI with the given geometry, atomically.

    When ``header`` is given (the input image's), its geometry (sform/qform codes, zooms) is
    kept so predictions carry exactly the input's affine and header geometry.
    """
    hdr = header.copy() if header is not None else nib.Nifti1Header()
    hdr.set_data_dtype(array.dtype)
    img = nib.Nifti1Image(array, affine, header=hdr)
    if header is not None:
        img.set_sform(affine, code=int(header["sform_code"]))
        img.set_qform(affine, code=int(header["qform_code"]))
    else:
        img.set_sform(affine, code=2)
        img.set_qform(affine, code=0)
    if spacing is not None:
        img.header.set_zooms(tuple(float(s) for s in spacing))
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def save_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write JSON atomically, sorted and indented so reruns diff cleanly."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def save_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """Write a compressed ``.npz`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


ATTEMPT_HEADER = "===== attempt"


class _Tee(io.TextIOBase):
    """Write to several text files at once (the job's log and its attempt's copy)."""

    def __init__(self, *files):
        self.files = files

    def write(self, text: str) -> int:
        for fh in self.files:
            fh.write(text)
        return len(text)

    def flush(self) -> None:
        for fh in self.files:
            fh.flush()


def attempt_log(path: str | os.PathLike[str]) -> Path:
    """The next free ``attempts/<name>.attemptN.log`` beside the log ``path``.

    Snakemake deletes a job's log before it retries the job, so each attempt also writes this
    copy, which Snakemake does not manage: the log of a training killed at its time limit is
    still there after the retry."""
    path = Path(path)
    folder = path.parent / "attempts"
    folder.mkdir(parents=True, exist_ok=True)
    n = 1
    while (folder / f"{path.stem}.attempt{n}.log").exists():
        n += 1
    return folder / f"{path.stem}.attempt{n}.log"


@contextlib.contextmanager
def log_to(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Send everything a step prints (and its traceback, on failure) to ``path``.

    The workflow gives every rule a ``log:`` file; this is how the adapters honour it.  Every
    run of the step also goes to its own ``attempts/<name>.attemptN.log`` (:func:`attempt_log`),
    headed ``===== attempt N``, so a job that was retried keeps the log of every attempt.
    """
    if path is None:
        yield
        return
    import socket
    import sys
    import time
    import traceback

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    copy = attempt_log(path)
    attempt = copy.stem.rsplit("attempt", 1)[-1]
    where = socket.gethostname()
    if os.environ.get("SLURM_JOB_ID"):
        where += f", SLURM job {os.environ['SLURM_JOB_ID']}"
    with (
        open(path, "a", buffering=1) as main,
        open(copy, "w", buffering=1) as side,
    ):
        fh = _Tee(main, side)
        with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            print(f"{ATTEMPT_HEADER} {attempt}: {stamp} on {where} (pid {os.getpid()})", file=fh)
            try:
                yield
            except Exception as exc:
                traceback.print_exc(file=fh)
                fh.flush()
                # also tell the console, so a failing job's reason is visible without the log:
                # all of a KitsnetError (it may list many problems, one a line), else the last
                if isinstance(exc, KitsnetError):
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    reason = traceback.format_exc().strip().splitlines()[-1]
                print(f"see {path}: {reason}", file=sys.__stderr__, flush=True)
                raise
