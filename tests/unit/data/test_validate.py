"""Bad input: malformed datasets (one per problem, generated here) make ``kitsnet validate`` and
the workflow fail with a line naming the case, the file and the problem, write nothing and leave
the dataset untouched; config errors stop the workflow before any job, naming the key."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitsnet.cli import main
from kitsnet.core.io import KitsnetError
from kitsnet.data.dataset import (
    IMAGE_NAME,
    LABEL_NAME,
    check_case_id,
    image_path,
    validate_dataset,
)
from kitsnet.data.synth import kits_affine

SHAPE = (8, 16, 16)
SPACING = (3.0, 0.8, 0.8)
FOLDS = 2


def _image(shape=SHAPE, dtype=np.int16) -> np.ndarray:
    img = np.full(shape, -1000, dtype)  # air around ...
    img[1:7, 2:14, 2:14] = 40  # ... a soft-tissue body ...
    img[3:5, 5:8, 5:8] = 180  # ... with an enhancing kidney
    return img


def _label(shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[3:5, 5:8, 5:8] = 1
    lab[4, 6, 6] = 2
    return lab


def _save(array, path: Path, spacing=SPACING, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, kits_affine(spacing) if affine is None else affine), path)


def make_valid(root: Path, n: int = 3) -> Path:
    for i in range(n):
        _save(_image(), root / f"case_{i:05d}" / IMAGE_NAME)
        _save(_label(), root / f"case_{i:05d}" / LABEL_NAME)
    return root


def _truncate(path: Path, keep: float | int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep])


def _set_pixdim(path: Path, value: float) -> None:
    """Patch pixdim[1] in the stored header (nibabel itself refuses to write 0 or < 0)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[80:84] = np.float32(value).tobytes()  # pixdim starts at byte 76
    path.write_bytes(gzip.compress(bytes(raw)))


# (name, mutation of a valid 3-case root, case named, problem text, lines reported)
C1 = "case_00001"
MALFORMED: list[tuple[str, Callable[[Path], None], str, str, int]] = [
    ("missing_image", lambda r: (r / C1 / IMAGE_NAME).unlink(), C1, "file is missing", 1),
    ("missing_label", lambda r: (r / C1 / LABEL_NAME).unlink(), C1, "file is missing", 1),
    (
        "truncated_gzip",
        lambda r: _truncate(r / C1 / IMAGE_NAME, 0.5),
        C1,
        "truncated or corrupt gzip",
        1,
    ),
    (
        "truncated_gzip_trailer",  # all voxels still there, only the CRC and length missing
        lambda r: _truncate(r / C1 / LABEL_NAME, -4),
        C1,
        "truncated or corrupt gzip",
        1,
    ),
    (
        "truncated_nifti",  # a whole gzip stream of too few voxels
        lambda r: (r / C1 / IMAGE_NAME).write_bytes(
            gzip.compress(gzip.decompress((r / C1 / IMAGE_NAME).read_bytes())[:-100])
        ),
        C1,
        "unreadable NIfTI",
        1,
    ),
    (
        "not_nifti",
        lambda r: (r / C1 / LABEL_NAME).write_bytes(gzip.compress(b"not a NIfTI file" * 40)),
        C1,
        "unreadable NIfTI",
        1,
    ),
    (
        "not_3d",
        lambda r: _save(np.stack([_image()] * 2, -1), r / C1 / IMAGE_NAME),
        C1,
        "expected a 3D image",
        1,
    ),
    (
        "shapes_disagree",
        lambda r: _save(_label((8, 16, 17)), r / C1 / LABEL_NAME),
        C1,
        "differs from image shape",
        1,
    ),
    (
        "affines_disagree",
        lambda r: _save(_label(), r / C1 / LABEL_NAME, spacing=(2.5, 0.8, 0.8)),
        C1,
        "affine differs from the image's",
        1,
    ),
    (
        "non_positive_spacing",
        lambda r: _set_pixdim(r / C1 / IMAGE_NAME, 0.0),
        C1,
        "non-positive or undefined voxel spacing",
        1,
    ),
    (
        "negative_spacing",
        lambda r: _set_pixdim(r / C1 / LABEL_NAME, -3.0),
        C1,
        "non-positive or undefined voxel spacing",
        1,
    ),
    (
        "absurd_spacing",
        lambda r: [
            _save(_image(), r / C1 / IMAGE_NAME, spacing=(300.0, 0.8, 0.8)),
            _save(_label(), r / C1 / LABEL_NAME, spacing=(300.0, 0.8, 0.8)),
        ],
        C1,
        "absurd voxel spacing",
        2,  # the image's and the label's
    ),
    (
        "nan_intensities",
        lambda r: _save(
            np.where(_label() == 2, np.nan, _image()).astype(np.float32), r / C1 / IMAGE_NAME
        ),
        C1,
        "NaN or inf intensities",
        1,
    ),
    (
        "not_hu",
        lambda r: _save(((_image() + 1000) / 1200.0).astype(np.float32), r / C1 / IMAGE_NAME),
        C1,
        "not plausible CT in HU",
        1,
    ),
    (
        "label_values",
        lambda r: _save(np.where(_label() == 2, 5, _label()).astype(np.uint8), r / C1 / LABEL_NAME),
        C1,
        "label values [5] outside {0,1,2,3}",
        1,
    ),
    (
        "no_kidney",
        lambda r: _save(np.zeros(SHAPE, np.uint8), r / C1 / LABEL_NAME),
        C1,
        "no kidney label",
        1,
    ),
    (
        "duplicate_id_unpadded",
        lambda r: shutil.copytree(r / C1, r / "case_1"),
        "case_1",
        "duplicate of case_00001",
        1,
    ),
    (
        "duplicate_id_case",
        lambda r: shutil.copytree(r / C1, r / "Case_00001"),
        "Case_00001",
        "duplicate of case_00001",
        1,
    ),
    (
        "malformed_id",
        lambda r: shutil.copytree(r / C1, r / "case_0042"),
        "case_0042",
        "malformed case id",
        1,
    ),
    (
        "case_is_a_file",
        lambda r: (r / "case_00003").write_text("not a folder"),
        "case_00003",
        "is not a folder",
        1,
    ),
    (
        "fewer_cases_than_folds",
        lambda r: [shutil.rmtree(r / f"case_{i:05d}") for i in (1, 2)],
        "",  # a dataset-wide problem: the line names the data root
        f"1 cases found, fewer than the {FOLDS} folds",
        1,
    ),
]
IDS = [m[0] for m in MALFORMED]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a hash of its bytes (folders: '')."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def malformed_roots(tmp_path_factory) -> dict[str, Path]:
    roots = {}
    for name, mutate, *_ in MALFORMED:
        root = make_valid(tmp_path_factory.mktemp(name) / "data")
        mutate(root)
        roots[name] = root
    return roots


def _problem_lines(text: str, case: str, what: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(case) and what in line]


def test_a_valid_dataset_has_no_problems(tmp_path):
    root = make_valid(tmp_path / "data")
    verdict = validate_dataset(root, folds=FOLDS)
    assert verdict["cases"] == ["case_00000", "case_00001", "case_00002"]
    assert main(["validate", str(root), "--folds", str(FOLDS)]) == 0


@pytest.mark.parametrize("name", IDS)
def test_kitsnet_validate_names_the_case_the_file_and_the_problem(
    name, malformed_roots, capsys, tmp_path, monkeypatch
):
    _, _, case, what, n_lines = MALFORMED[IDS.index(name)]
    root = malformed_roots[name]
    before = _snapshot(root)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(root), "--folds", str(FOLDS)]) == 1
    err = capsys.readouterr().err
    assert f"has {n_lines} problem(s)" in err, err
    lines = _problem_lines(err, case or str(root), what)
    assert len(lines) == n_lines, err
    for line in lines:
        assert str(root) in line  # the file (or, dataset-wide, the data root)
        if case:
            assert re.search(rf"{re.escape(str(root))}/{case}(/|:)", line), line
    assert _snapshot(root) == before  # the dataset folder is never written to
    assert not list(tmp_path.iterdir())  # and nothing else either


def test_all_problems_are_reported_at_once(tmp_path, capsys):
    """One case per problem in one dataset: every problem gets its own line."""
    root = make_valid(tmp_path / "data", n=6)
    (root / "case_00001" / IMAGE_NAME).unlink()
    _save(np.zeros(SHAPE, np.uint8), root / "case_00002" / LABEL_NAME)
    _save(np.where(_label() == 2, 9, _label()).astype(np.uint8), root / "case_00003" / LABEL_NAME)
    _save(((_image() + 1000) / 1200.0).astype(np.float32), root / "case_00004" / IMAGE_NAME)
    shutil.copytree(root / "case_00005", root / "case_5")
    with pytest.raises(KitsnetError) as err:
        validate_dataset(root, folds=FOLDS)
    msg = str(err.value)
    assert "has 5 problem(s)" in msg
    for case, what in [
        ("case_00001", "file is missing"),
        ("case_00002", "no kidney label"),
        ("case_00003", "label values [9]"),
        ("case_00004", "not plausible CT"),
        ("case_5", "duplicate of case_00005"),
    ]:
        assert len(_problem_lines(msg, case, what)) == 1, msg


def test_case_ids_cannot_point_outside_the_data_root(tmp_path):
    for bad in ("../case_00001", "case_00001/..", "case_1", "/etc", "case_00001\n", ""):
        with pytest.raises(KitsnetError, match="malformed case id"):
            check_case_id(bad)
        with pytest.raises(KitsnetError):
            image_path(tmp_path, bad)
    assert image_path(tmp_path, "case_00042") == tmp_path / "case_00042" / IMAGE_NAME


# ----------------------------------------------------------------------------- the workflow
def snakemake(repo: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    if not (workdir / "config").exists():
        shutil.copytree(repo / "config", workdir / "config")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)


def _real_data_config(workdir: Path, root: Path, **extra) -> Path:
    lines = [f"data_root: {root}", "synthetic: null", f"folds: {FOLDS}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path = workdir / "real.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.workflow  # runs the validate_dataset job for real: ~10 s each
@pytest.mark.parametrize("name", IDS)
def test_the_workflow_stops_on_bad_data_and_writes_nothing(name, malformed_roots, repo, tmp_path):
    """Problems visible from names alone stop the workflow while it parses; the others stop
    its first job, validate_dataset; either way no other job starts and no output is written."""
    _, _, case, what, n_lines = MALFORMED[IDS.index(name)]
    root = malformed_roots[name]
    before = _snapshot(root)
    cfg = _real_data_config(tmp_path, root)
    proc = snakemake(repo, tmp_path, "--cores", "2", "--configfile", str(cfg))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = _problem_lines(out, case or str(root), what)
    assert len(lines) >= n_lines, out[-4000:]
    assert all(str(root) in line for line in lines)
    started = set(re.findall(r"^(?:local)?rule (\w+):", out, flags=re.M))
    assert started <= {"validate_dataset"}, started
    results = tmp_path / "results"
    written = [p for p in results.rglob("*") if p.is_file()] if results.exists() else []
    assert all(p.parts[len(results.parts)] == "logs" for p in written), written
    assert _snapshot(root) == before


def test_unknown_nested_config_key_is_named(repo, tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("training:\n  epochz: 3\n")
    proc = snakemake(repo, tmp_path, "-n", "--configfile", str(cfg))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "training.epochz: unknown key" in out, out[-3000:]


@pytest.mark.parametrize(
    "args, key",
    [
        (["--config", "folds=two"], "folds: 'two' is not valid"),
        (["--config", "seed=-1"], "seed: -1 is not valid"),
        (["--config", "configurations=[3d_fullress]"], "configurations[0]: '3d_fullress'"),
    ],
)
def test_config_of_the_wrong_type_is_named(repo, tmp_path, args, key):
    proc = snakemake(repo, tmp_path, "-n", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert key in out, out[-3000:]
    assert not (tmp_path / "results").exists()


def test_missing_data_root_is_named(repo, tmp_path):
    cfg = _real_data_config(tmp_path, tmp_path / "no_such_folder")
    proc = snakemake(repo, tmp_path, "-n", "--configfile", str(cfg))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "data_root:" in out and "no_such_folder" in out and "missing or not a folder" in out


def test_fold_index_out_of_range_is_named(repo, tmp_path):
    root = make_valid(tmp_path / "data")
    cfg = _real_data_config(tmp_path, root)
    target = "results/models/2d/fold_7/model_final.pt"
    proc = snakemake(repo, tmp_path, "-n", "--configfile", str(cfg), "--", target)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "fold 7 is out of range" in out and "'folds' is 2" in out, out[-3000:]


def test_rules_interpolate_no_config_into_shell_commands(repo):
    """Every rule runs a Python script (script:), none a shell command built from strings."""
    for smk in [repo / "Snakefile", *(repo / "rules").glob("*.smk")]:
        text = smk.read_text()
        assert not re.search(r"^\s+shell:", text, flags=re.M), smk
        assert "shell(" not in text, smk
