"""The benchmarks' one source of inputs: synthetic CT from kitsnet's own generator
(``kitsnet.data.synth``, stretched to the size a benchmark needs) and real KiTS21 label maps
($KITSNET_KITS21_LABELS, which has no imaging) with CT-like intensities painted on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: HU painted per label: fat-like background, enhancing kidney, tumour, near-water cyst
HU = {0: -100.0, 1: 160.0, 2: 110.0, 3: 10.0}
#: foreground intensity statistics of painted images, for planning on real geometry
PAINTED_FI = {"mean": 100.0, "std": 75.0, "percentile_00_5": -100.0, "percentile_99_5": 250.0}
DETAILED = 2  # synth case 2 of seed 0: 1 mm slices and all four labels


def synthetic_case(shape: list[int], index: int = DETAILED) -> tuple[np.ndarray, np.ndarray]:
    """Synth case ``index`` of seed 0 stretched to ``shape`` (linear for the image, nearest for
    the labels): a float32 HU image and uint8 labels with KiTS21's anatomy at any size."""
    from scipy import ndimage

    from kitsnet.data.synth import generate_case

    image, label, _ = generate_case(index, 0)
    zoom = [n / s for n, s in zip(shape, image.shape, strict=True)]
    image = ndimage.zoom(image.astype(np.float32), zoom, order=1)
    label = ndimage.zoom(label, zoom, order=0)
    assert image.shape == label.shape == tuple(shape), (image.shape, shape)
    return image, label


def preprocessed_files(folder: Path, case: str) -> list[Path]:
    """kitsnet's preprocessed arrays of ``case``: image (1, *S) float32, labels, json."""
    return [Path(folder) / f"{case}{x}" for x in ("_image.npy", "_seg.npy", ".json")]


def write_cases(
    root: Path, cases: list[str], shape: list[int], norm: dict, spacing: list[float]
) -> tuple[Path, Path]:
    """Preprocessed cases (synth cases 0, 1, ... stretched to ``shape``, CT-normalised with
    ``norm``) in kitsnet's layout in ``root/kitsnet``, viewed by nnU-Net in ``root/nnunet``."""
    from kitsnet.core.io import save_json
    from kitsnet.preprocess.case import class_locations, normalize_ct
    from tests.reference.nnunet_plans import nnunet_case

    kits, nnu = Path(root) / "kitsnet", Path(root) / "nnunet"
    kits.mkdir(parents=True, exist_ok=True)
    nnu.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases):
        image, seg = synthetic_case(shape, i)
        files = preprocessed_files(kits, case)
        np.save(files[0], normalize_ct(image, norm)[None])
        np.save(files[1], seg)
        locs = class_locations(seg, np.random.default_rng([0, i]))
        save_json({"shape": shape, "spacing": spacing, "class_locations": locs}, files[2])
        nnunet_case(files, nnu, case)
    return kits, nnu


def label_map(case: str) -> Path:
    """The real KiTS21 (majority-vote) label map of ``case``, from $KITSNET_KITS21_LABELS."""
    from kitsnet.data.dataset import label_maps_from_env

    return label_maps_from_env()[0][case]["MAJ"]


def missing_label_maps(cases: list[str]) -> str | None:
    """Why a benchmark on these real label maps cannot run here, or None."""
    from kitsnet.data.dataset import LABEL_MAPS_ENV, label_maps_from_env

    maps, why = label_maps_from_env()
    missing = [c for c in cases if "MAJ" not in maps.get(c, {})]
    if maps and missing:
        return f"KiTS21 label maps missing from ${LABEL_MAPS_ENV}: {', '.join(missing)}"
    return None if maps else why


def real_geometry_fingerprint() -> dict:
    """A dataset fingerprint from the shapes and spacings of all real label maps, with the
    intensity statistics of painted images, for planning."""
    import nibabel as nib

    from kitsnet.data.dataset import label_maps_from_env

    maps = label_maps_from_env()[0]
    headers = [nib.load(m["MAJ"]).header for m in maps.values() if "MAJ" in m]
    return {
        "shapes": [[int(s) for s in h.get_data_shape()] for h in headers],
        "spacings": [[float(z) for z in h.get_zooms()] for h in headers],
        "foreground_intensity": dict(PAINTED_FI),
    }


def real_case(case: str, out: Path, crop: int | None = None) -> tuple[Path, Path]:
    """``out/case`` in KiTS21's layout from the real label map of ``case`` (with ``crop``: cut
    to its foreground's bounding box plus ``crop`` voxels): the labels and a CT-like image
    painted from them (HU per class, noise, some air as validation expects)."""
    import nibabel as nib

    lab = nib.load(label_map(case))
    if crop is not None:  # slicer keeps the affine right
        fg = np.nonzero(np.asarray(lab.dataobj))
        lab = lab.slicer[
            tuple(slice(max(0, int(a.min()) - crop), int(a.max()) + 1 + crop) for a in fg)
        ]
    seg = np.asarray(lab.dataobj).astype(np.uint8)
    img = np.vectorize(HU.get, otypes=[np.float32])(seg)
    img = img + np.random.default_rng(0).normal(0, 25, seg.shape)
    img[:, :20] = -1000.0
    (Path(out) / case).mkdir(parents=True)
    image, label = (
        Path(out) / case / "imaging.nii.gz",
        Path(out) / case / "aggregated_MAJ_seg.nii.gz",
    )
    nib.save(nib.Nifti1Image(img.astype(np.float32), lab.affine, lab.header), image)
    nib.save(nib.Nifti1Image(seg, lab.affine, lab.header), label)
    return image, label
