"""KiTS23's layout (``case_XXXXX/segmentation.nii.gz``) through validation and the workflow, with
the imaging fetched by the workflow itself from a KiTS-like HTTP host (on 127.0.0.1)."""

from __future__ import annotations

import functools
import hashlib
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, run_workflow

from kitsnet.cli import main
from kitsnet.data.synth import make_dataset


@pytest.fixture(scope="module")
def kits23(tmp_path_factory) -> dict[str, Path]:
    """Six synthetic cases as KiTS23 ships them: a full copy (imaging + segmentation), a
    labels-only folder (the kits23 repository before its download step) and the imaging in the
    Hugging Face path layout (``images/case_XXXXX.nii.gz``)."""
    root = tmp_path_factory.mktemp("kits23")
    full, labels, hub = root / "full", root / "labels", root / "hub" / "images"
    make_dataset(full, 6, seed=3)
    hub.mkdir(parents=True)
    for case in sorted(p.name for p in full.iterdir()):
        (full / case / "aggregated_MAJ_seg.nii.gz").rename(full / case / "segmentation.nii.gz")
        (labels / case).mkdir(parents=True)
        shutil.copyfile(full / case / "segmentation.nii.gz", labels / case / "segmentation.nii.gz")
        shutil.copyfile(full / case / "imaging.nii.gz", hub / f"{case}.nii.gz")
    return {"full": full, "labels": labels, "hub": hub.parent}


def test_kitsnet_validate_reads_the_kits23_layout(kits23, capsys):
    assert main(["validate", str(kits23["full"])]) == 0
    assert "6 cases (kits23 layout)" in capsys.readouterr().out
    # told it is KiTS21, it names the label file each case lacks
    assert main(["validate", str(kits23["full"]), "--dataset", "kits21"]) != 0
    err = capsys.readouterr().err
    assert "case_00000" in err and "aggregated_MAJ_seg.nii.gz: file is missing" in err


@pytest.fixture
def host(kits23):
    """A plain HTTP server on 127.0.0.1 serving the imaging like KiTS's dataset root."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(kits23["hub"]))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.workflow
def test_micro_workflow_on_kits23_labels_fetches_the_imaging_and_runs(kits23, host, tmp_path):
    labels = kits23["labels"]
    before = _digests(labels)
    cfg = tmp_path / "kits23.yaml"
    cfg.write_text(
        f"data_root: {labels}\ndataset: kits23\nsynthetic: null\nfetch_imaging: true\n"
        f"fetch_base_url: {host}\nconfigurations: [3d_fullres]\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    run_workflow(
        work, "--cores", "2", "--configfile", str(REPO / "tests/data/micro.yaml"), str(cfg)
    )
    res = work / "results"
    rows = (res / "table1.csv").read_text().splitlines()
    assert rows[1].startswith("3d_fullres,") and len(rows) == 2
    fetched = sorted((res / "data" / "kits23").glob("case_*/imaging.nii.gz"))
    assert len(fetched) == 6
    for image in fetched:
        served = kits23["hub"] / "images" / f"{image.parent.name}.nii.gz"
        assert image.read_bytes() == served.read_bytes()
        assert (image.parent / "segmentation.nii.gz").is_file()
    assert _digests(labels) == before  # the user's folder is only read
