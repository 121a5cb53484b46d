"""The training input pipeline: preprocessed cases, patch boxes as nnU-Net draws them, crops.

Box semantics are nnU-Net v2's (``nnUNetDataLoader.get_bbox``, checked against it in
``tests/nnunet/test_loader_nnunet.py``).  With spatial augmentation the loader samples a
*region* larger than the patch (``region_size``) and the augmentation centre-crops the patch out
of it.
The region may hang over the image by half the difference between region and patch on either
side (``need``, rounded up), so the final patches' centres cover ``[p/2, S - p/2]`` of every
axis: the borders are trained as often as nnU-Net trains them.  An axis shorter than the region
is padded on both sides.  Foreground-forced regions are centred on a random voxel of a random
class present in the case and only clipped at the lower bound, as in nnU-Net.  2D plans take
one slice along axis 0 (a random one, or one through the chosen foreground voxel).  A ROI
configuration's cases are folders of boxes (:mod:`kitsnet.preprocess.roi`): a case is drawn,
then one of its boxes, and the box is sampled from as a case is (padded where it is smaller than
the region).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kitsnet.core.io import load_json
from kitsnet.preprocess.roi import ITEM_FILES, MANIFEST, case_items
from kitsnet.stages import find_previous_stage

CASE_FILES = ("_image.npy", "_seg.npy", ".json")


class CaseStore:
    """Memory-mapped preprocessed cases (+ optional previous-stage segmentations).

    ``cropped`` (a ROI configuration, :mod:`kitsnet.preprocess.roi`): every case is a folder of
    boxes, and the arrays are those of its items ``<case>/box<k>``, each with its own cropped
    previous stage; ``groups`` lists each case's items (see :meth:`PatchSampler.draw_case`).
    """

    def __init__(
        self,
        cases: list[str],
        data_dir: Path,
        prev_dirs: list[Path] | None = None,
        cropped: bool = False,
    ):
        self.groups = [case_items(data_dir, c) for c in cases] if cropped else None
        items = [i for g in self.groups for i in g] if self.groups else list(cases)
        self.cases = items
        self.image = {c: np.load(data_dir / f"{c}_image.npy", mmap_mode="r") for c in items}
        self.seg = {c: np.load(data_dir / f"{c}_seg.npy", mmap_mode="r") for c in items}
        self.locs = {
            c: {
                int(k): np.asarray(v, dtype=np.int64).reshape(-1, 3)
                for k, v in load_json(data_dir / f"{c}.json")["class_locations"].items()
            }
            for c in items
        }
        self.prev = None
        if cropped:
            self.prev = {c: np.load(data_dir / f"{c}_prev.npy", mmap_mode="r") for c in items}
        elif prev_dirs:
            self.prev = {
                c: np.load(find_previous_stage(c, prev_dirs), mmap_mode="r") for c in items
            }


def input_files(
    cases: list[str],
    data_dir: Path,
    prev_dirs: list[Path] | None = None,
    cropped: bool = False,
) -> list[Path]:
    """Every file training reads for ``cases`` (what a checkpoint's fingerprint covers)."""
    if cropped:
        return [
            data_dir / f"{item}{x}"
            for c in cases
            for item in case_items(data_dir, c)
            for x in ITEM_FILES
        ] + [data_dir / c / MANIFEST for c in cases]
    files = [data_dir / f"{c}{x}" for c in cases for x in CASE_FILES]
    if prev_dirs:
        files += [find_previous_stage(c, prev_dirs) for c in cases]
    return files


def crop(
    arr: np.ndarray,
    lb: np.ndarray,
    size: tuple[int, ...],
    fill: float,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Crop ``arr[..., lb:lb+size]`` over the trailing len(size) axes, padding with ``fill``.

    With ``out`` (shape ``(*lead, *size)``, any dtype the values cast to) the crop is written
    there, converted on the fly, and returned: the sampler fills its batch arrays in place, one
    pass over each voxel.  Only the part of the box outside ``arr`` is set to ``fill``.
    """
    lead = arr.shape[: arr.ndim - len(size)]
    spatial = arr.shape[arr.ndim - len(size) :]
    if out is None:
        out = np.empty((*lead, *size), dtype=arr.dtype)
    src, dst = [], []
    for lo, sz, full in zip(lb, size, spatial, strict=True):
        a, b = max(lo, 0), min(lo + sz, full)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - lo, a - lo + max(0, b - a)))
    np.copyto(out[(..., *dst)], arr[(..., *src)])
    # The padding: per axis, the slabs before and after the copied span (inside the span on the
    # axes before it, everything on the axes after it), which tile the rest of the box.
    for axis, (d, sz) in enumerate(zip(dst, size, strict=True)):
        rest = (slice(None),) * (len(size) - axis - 1)
        out[(..., *dst[:axis], slice(0, d.start), *rest)] = fill
        out[(..., *dst[:axis], slice(d.stop, sz), *rest)] = fill
    return out


def box_range(
    shape: tuple[int, ...] | list[int], region: list[int], patch: list[int]
) -> tuple[list[int], list[int]]:
    """Lowest and highest start (inclusive) of a random region, per axis.

    ``need`` = region - patch (at least region - shape, so a short axis is padded on both
    sides); the start may lie ``ceil(need / 2)`` before the image and end as far past it.
    """
    lo, hi = [], []
    for s, r, p in zip(shape, region, patch, strict=True):
        need = max(r - p, r - s)
        half = -(-need // 2)
        lo.append(-half)
        hi.append(s + half - r)
    return lo, hi


def region_size(patch: list[int], aug: dict, dim: int) -> list[int]:
    """The region sampled for a patch: nnU-Net's ``get_patch_size``.

    The patch's corner vector is rotated by the largest angle (at most 90 degrees) in each
    coordinate plane in turn, the per-axis maximum of the absolute coordinates kept, and the
    result divided by ``region_scale`` (nnU-Net's 0.85, not the scale range's minimum), rounded
    down.  Without rotation and scaling the region is the patch.
    """
    if not (aug.get("rotation_p", 0) > 0 or aug.get("scale_p", 0) > 0):
        return list(patch)
    deg = float(aug.get("rotation_deg_2d", 180.0) if dim == 2 else aug.get("rotation_deg", 30.0))
    theta = math.radians(min(deg, 90.0)) if aug.get("rotation_p", 0) > 0 else 0.0
    c, s = math.cos(theta), math.sin(theta)
    v = [float(p) for p in patch]
    # (axes, sign of the sine) per plane, in nnU-Net's order: about x, y, z (2D: the one plane)
    planes = [((0, 1), 1.0)] if dim == 2 else [((1, 2), 1.0), ((0, 2), -1.0), ((0, 1), 1.0)]
    out = list(v)
    for (i, j), sign in planes:
        rotated = list(v)
        rotated[i] = v[i] * c + sign * v[j] * s
        rotated[j] = -sign * v[i] * s + v[j] * c
        out = [max(o, abs(r)) for o, r in zip(out, rotated, strict=True)]
    scale = float(aug.get("region_scale", 0.85))
    return [int(o / scale) for o in out]


def augment_settings(augmentation: dict, dim: int) -> dict:
    """The ``augmentation`` config as :func:`kitsnet.train.augment.augment_batch` takes it for a
    ``dim``-D network: the 2D rotation range in place of the 3D one; the sampler's
    (``region_scale``) and the cascade's (``cascade_*``) settings left out."""
    cfg = {
        k: v
        for k, v in augmentation.items()
        if k not in ("region_scale", "rotation_deg_2d") and not k.startswith("cascade_")
    }
    if dim == 2 and "rotation_deg_2d" in augmentation:
        cfg["rotation_deg"] = augmentation["rotation_deg_2d"]
    return cfg


class PatchSampler:
    """Samples (image, seg) regions like nnU-Net's loader: the last ``oversample`` fraction of
    a batch forced to foreground (see the module docstring for the box rule)."""

    def __init__(
        self,
        store: CaseStore,
        region: list[int],
        patch: list[int],
        dim: int,
        oversample: float,
        rng: np.random.Generator,
    ):
        self.store, self.dim = store, dim
        # 2D: a one-slice box along axis 0
        self.region = [1, *region] if dim == 2 else list(region)
        self.patch = [1, *patch] if dim == 2 else list(patch)
        self.oversample, self.rng = oversample, rng

    def draw_case(self) -> str:
        """A random case.  Cropped cases (``store.groups``): a random case, then one of its
        boxes, so a case counts as much as in uncropped training whatever its number of boxes
        (a two-kidney case is not drawn twice as often as a one-kidney case)."""
        groups = getattr(self.store, "groups", None)  # stores are duck-typed (tests)
        if not groups:
            return self.store.cases[self.rng.integers(len(self.store.cases))]
        group = groups[self.rng.integers(len(groups))]
        return group[self.rng.integers(len(group))]

    def box(self, case: str, force_fg: bool) -> np.ndarray:
        """The start of one region in ``case`` (may be negative or run past the image)."""
        shape = self.store.seg[case].shape
        lo, hi = box_range(shape, self.region, self.patch)
        locs = {k: v for k, v in self.store.locs[case].items() if len(v)}
        if force_fg and locs:
            cls = sorted(locs)[self.rng.integers(len(locs))]
            voxel = locs[cls][self.rng.integers(len(locs[cls]))]
            starts = zip(lo, voxel, self.region, strict=True)
            return np.array([max(a, v - r // 2) for a, v, r in starts])
        return np.array([self.rng.integers(a, b + 1) for a, b in zip(lo, hi, strict=True)])

    def sample(self, batch_size: int, n_prev: int) -> tuple[np.ndarray, np.ndarray]:
        """A batch (float32 image channels [+ previous-stage one-hot], uint8 labels).

        Each crop is written straight into the batch arrays, converting while copying, so every
        voxel of the region is read from the memory map and written exactly once.
        """
        n_forced_from = round(batch_size * (1 - self.oversample))
        boxes = []
        for i in range(batch_size):
            case = self.draw_case()
            boxes.append((case, self.box(case, force_fg=i >= n_forced_from)))
        size = tuple(self.region)
        n_img = self.store.image[boxes[0][0]].shape[0]
        images = np.empty((batch_size, n_img + n_prev, *size), np.float32)
        segs = np.empty((batch_size, 1, *size), np.uint8)
        for i, (case, lb) in enumerate(boxes):
            crop(self.store.image[case], lb, size, 0.0, out=images[i, :n_img])
            crop(self.store.seg[case], lb, size, 0, out=segs[i, 0])
            if self.store.prev is not None:
                prev = crop(self.store.prev[case], lb, size, 0)
                for k in range(1, n_prev + 1):
                    np.equal(prev, k, out=images[i, n_img + k - 1], casting="unsafe")
        if self.dim == 2:  # drop the one-slice axis: (B, C, 1, H, W) -> (B, C, H, W)
            images, segs = images[:, :, 0], segs[:, :, 0]
        return images, segs
