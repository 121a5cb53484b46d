"""CT normalisation and resampling to a plan's grid, and the inverse for predictions.

One resampling function serves both directions (to the plan's spacing and back to the original
grid), so geometry round-trips by construction: voxel centres are aligned (``grid_mode``), so an
image resampled to another spacing and back covers the same physical extent.

Images: third-order spline.  Masks: each label resampled linearly as a binary map and
thresholded at 0.5 (label-safe: no label can appear that is not in the input).  Anisotropic
cases (slice spacing > ``threshold`` x in-plane) are resampled in-plane with that order and
with nearest neighbour along the slice axis, as nnU-Net does, to avoid spline ringing across
thick slices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .io import load_volume, save_json

N_CLASS_LOCATIONS = 10000  # foreground voxels remembered per class for oversampling


def _is_anisotropic(spacing: tuple[float, ...] | list[float], threshold: float) -> bool:
    return max(spacing) / min(spacing) > threshold


def resample(
    array: np.ndarray,
    new_shape: tuple[int, ...] | list[int],
    order: int,
    spacing: tuple[float, ...] | list[float] | None = None,
    anisotropy_threshold: float = 3.0,
) -> np.ndarray:
    """Resample a (C, *S) or (*S) float array to ``new_shape`` (spatial), float32 out.

    ``spacing`` is the spacing of the *coarser* of the two grids (original for preprocessing,
    original for export), used only to decide the anisotropic treatment.
    """
    squeeze = array.ndim == len(new_shape)
    data = array[None] if squeeze else array
    new_shape = tuple(int(s) for s in new_shape)
    out = np.empty((data.shape[0], *new_shape), dtype=np.float32)
    aniso_axis = None
    if spacing is not None and _is_anisotropic(spacing, anisotropy_threshold):
        aniso_axis = int(np.argmax(spacing))
    for c in range(data.shape[0]):
        chan = np.asarray(data[c], dtype=np.float32)
        if tuple(chan.shape) == new_shape:
            out[c] = chan
            continue
        zoom = [n / o for n, o in zip(new_shape, chan.shape, strict=True)]
        if aniso_axis is None:
            out[c] = ndimage.zoom(
                chan, zoom, order=order, mode="nearest", grid_mode=True, output=np.float32
            )
        else:
            inplane = [1.0 if a == aniso_axis else z for a, z in enumerate(zoom)]
            along = [zoom[a] if a == aniso_axis else 1.0 for a in range(len(zoom))]
            tmp = ndimage.zoom(
                chan, inplane, order=order, mode="nearest", grid_mode=True, output=np.float32
            )
            out[c] = ndimage.zoom(
                tmp, along, order=0, mode="nearest", grid_mode=True, output=np.float32
            )
    return out[0] if squeeze else out


def resample_labels(
    seg: np.ndarray,
    new_shape: tuple[int, ...] | list[int],
    spacing: tuple[float, ...] | list[float] | None = None,
    anisotropy_threshold: float = 3.0,
) -> np.ndarray:
    """Label-safe resampling: each label as a linearly resampled binary map, threshold 0.5."""
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(seg.shape) == new_shape:
        return seg.astype(np.uint8)
    out = np.zeros(new_shape, dtype=np.uint8)
    for label in np.unique(seg):
        if label == 0:
            continue
        mask = resample(
            (seg == label).astype(np.float32), new_shape, 1, spacing, anisotropy_threshold
        )
        out[mask >= 0.5] = label
    return out


def normalize_ct(image: np.ndarray, norm: dict) -> np.ndarray:
    """nnU-Net's CT scheme: clip to the foreground 0.5/99.5 percentiles, then z-score."""
    lo, hi = norm["clip"]
    out = np.clip(np.asarray(image, dtype=np.float32), lo, hi)
    out -= np.float32(norm["mean"])
    out /= np.float32(max(norm["std"], 1e-8))
    return out


def class_locations(seg: np.ndarray, rng: np.random.Generator) -> dict[str, list[list[int]]]:
    """Up to N_CLASS_LOCATIONS voxel coordinates per foreground class, for oversampling."""
    locs: dict[str, list[list[int]]] = {}
    for label in (1, 2, 3):
        coords = np.argwhere(seg == label)
        if len(coords) > N_CLASS_LOCATIONS:
            coords = coords[rng.choice(len(coords), N_CLASS_LOCATIONS, replace=False)]
        locs[str(label)] = coords.tolist()
    return locs


def preprocess_image(
    image: np.ndarray, spacing: list[float] | tuple[float, ...], plan: dict
) -> np.ndarray:
    """Normalise then resample one CT volume to the plan's grid -> (1, *S) float32."""
    from .plan import target_shape

    shape = target_shape(image.shape, list(spacing), plan["spacing"])
    norm = normalize_ct(image, plan["normalization"])
    return resample(norm, shape, 3, spacing, plan["anisotropy_threshold"])[None]


def geometry_of(vol, case: str) -> dict:
    """What export needs to undo resampling and write the input's exact geometry."""
    hdr = vol.header
    return {
        "case": case,
        "original_shape": list(vol.array.shape),
        "original_spacing": list(vol.spacing),
        "affine": vol.affine.tolist(),
        "sform_code": int(hdr["sform_code"]) if hdr is not None else 2,
        "qform_code": int(hdr["qform_code"]) if hdr is not None else 0,
    }


def preprocess_case(
    image_file: str | Path,
    label_file: str | Path,
    case: str,
    plan: dict,
    out_image: str | Path,
    out_seg: str | Path,
    out_json: str | Path,
    seed: int = 0,
) -> None:
    """Preprocess one KiTS21 case to the plan's grid.

    Writes ``image`` (1, *S) float32 and ``seg`` (*S) uint8 as separate ``.npy`` files so the
    training loader can memory-map them (a fullres KiTS21 case is hundreds of MB), and a JSON
    with the geometry and the foreground class locations.
    """
    from .io import atomic_path
    from .plan import target_shape

    img = load_volume(image_file, case)
    lab = load_volume(label_file, case)
    image = preprocess_image(np.asarray(img.array), img.spacing, plan)
    shape = target_shape(img.array.shape, list(img.spacing), plan["spacing"])
    seg = resample_labels(
        np.asarray(lab.array).astype(np.uint8), shape, img.spacing, plan["anisotropy_threshold"]
    )
    rng = np.random.default_rng([seed, int(case.split("_")[1])])
    props = geometry_of(img, case)
    props.update(
        {
            "shape": list(seg.shape),
            "spacing": plan["spacing"],
            "class_locations": class_locations(seg, rng),
        }
    )
    for arr, path in ((image, out_image), (seg, out_seg)):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
    save_json(props, out_json)
