"""The spatial transform: per-sample rotation and scaling, and the centre crop to the patch.

Separate from the intensity transforms because it is where the input's extra context (the
loader samples more than the patch) is consumed and where labels must stay labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kitsnet.train.augment.draws import _rand, _uniform


def _centre_start(in_shape: Sequence[int], patch: Sequence[int]) -> list[int]:
    """Crop start per axis, as nnU-Net's crop around ``floor(shape / 2)``."""
    return [s // 2 - p // 2 for s, p in zip(in_shape, patch, strict=True)]


def _centre_index(in_shape: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    """The spatial slices of the centre crop."""
    start = _centre_start(in_shape, patch)
    return tuple(slice(b, b + p) for b, p in zip(start, patch, strict=True))


def _centre_crop(x: Tensor, patch: Sequence[int]) -> Tensor:
    return x[(slice(None), slice(None), *_centre_index(x.shape[2:], patch))]


def _affine_matrices(angles: Tensor, scales: Tensor, dim: int) -> Tensor:
    """Per-sample ``R @ S`` as nnU-Net builds it (3D: ``Rz @ Ry @ Rx @ S``), shape (n, dim, dim)."""
    n = angles.shape[0]
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    if dim == 2:
        rot = torch.stack([c[:, 0], -s[:, 0], s[:, 0], c[:, 0]], -1).view(n, 2, 2)
    else:
        rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], -1)
        ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], -1)
        rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], -1)
        rot = rz.view(n, 3, 3) @ ry.view(n, 3, 3) @ rx.view(n, 3, 3)
    return rot * scales.view(n, 1, 1)  # right-multiplying by diag(scale) scales the columns


def _sampling_grid(matrices: Tensor, in_shape: Sequence[int], patch: Sequence[int]) -> Tensor:
    """``grid_sample`` grid (align_corners=True) that maps each patch voxel through the affine.

    Patch coordinates are centred on the patch centre, transformed, and placed on the same
    centre the plain crop uses, so an identity matrix samples exactly the crop's voxels.  In
    normalised coordinates that is ``u_in = D_in^-1 A D_patch u_out + t``.
    """
    start = _centre_start(in_shape, patch)
    centre = [b + (p - 1) / 2 for b, p in zip(start, patch, strict=True)]
    return _box_grid(matrices, centre, [0] * len(patch), in_shape, patch)


def _box_grid(
    matrices: Tensor,
    centre: Sequence[float],
    origin: Sequence[int],
    box: Sequence[int],
    patch: Sequence[int],
) -> Tensor:
    """The grid that samples ``x = A (p - (patch - 1) / 2) + centre`` (voxel units of the whole
    input) from the box of shape ``box`` starting at voxel ``origin`` of the input.

    This is what ``affine_grid`` computes, built from per-axis ramps instead: the map is
    separable, so each output coordinate is a sum of one ramp per patch axis and only the last
    addition touches every voxel; on one CPU core that is about five times faster than
    ``affine_grid``'s batched matrix product over a homogeneous base grid.
    """
    n, dim = matrices.shape[0], len(patch)
    half_in = matrices.new_tensor([max(s - 1, 1) / 2 for s in box])
    half_patch = matrices.new_tensor([(p - 1) / 2 for p in patch])
    local = matrices.new_tensor([c - o for c, o in zip(centre, origin, strict=True)])
    linear = matrices * half_patch.view(1, 1, dim) / half_in.view(1, dim, 1)
    shift = local / half_in - 1
    ramps = []
    for j, p in enumerate(patch):  # ramp j: -1 .. 1 along patch axis j (0 if the axis is flat)
        shape = [1] * (dim + 1)
        shape[1 + j] = p
        ramp = torch.linspace(-1, 1, p, dtype=matrices.dtype, device=matrices.device)
        ramps.append((ramp if p > 1 else torch.zeros_like(ramp)).view(shape))
    grid = matrices.new_empty((n, *patch, dim))
    coef = linear.view(n, dim, dim, *(1,) * dim)
    for a in range(dim):  # input axis a is grid component dim-1-a: grid_sample lists x first
        acc = shift[a] + coef[:, a, 0] * ramps[0]
        for j in range(1, dim - 1):
            acc = acc + coef[:, a, j] * ramps[j]
        torch.addcmul(acc, coef[:, a, dim - 1], ramps[dim - 1], out=grid[..., dim - 1 - a])
    return grid


def _reach(
    matrix: Sequence[Sequence[float]],
    centre: Sequence[float],
    in_shape: Sequence[int],
    patch: Sequence[int],
) -> tuple[list[int], list[int]]:
    """Origin and shape of the smallest box of the input that a transformed patch reads.

    The patch's image under the affine lies within ``centre +- |A| (patch - 1) / 2``; one
    voxel of margin covers the linear interpolation's second neighbour and rounding.  Points
    outside the input read zeros whether or not the box is clipped, so clipping is exact.
    """
    origin, shape = [], []
    for a, (c, s) in enumerate(zip(centre, in_shape, strict=True)):
        r = sum(abs(m) * (p - 1) / 2 for m, p in zip(matrix[a], patch, strict=True))
        lo = max(math.floor(c - r) - 1, 0)
        hi = min(math.ceil(c + r) + 1, s - 1)
        origin.append(lo)
        shape.append(hi - lo + 1)
    return origin, shape


def _spatial(
    image: Tensor,
    seg: Tensor,
    patch: Sequence[int],
    n_int: int,
    cfg: dict[str, Any],
    g: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Rotate/scale the samples nnU-Net's probabilities pick and centre-crop all to ``patch``.

    One sample at a time, straight into fresh output tensors: a sample that is not moved is a
    plain copy of its centre crop; a moved one is resampled from the box of the input its patch
    reaches (:func:`_reach`), so only that box of the labels is converted to float for the
    nearest-neighbour ``grid_sample`` and no sub-batch of the (large) input is gathered.
    """
    b, dim, device = image.shape[0], image.ndim - 2, image.device
    n_angles = 3 if dim == 3 else 1
    do_rot = _rand(g, b, device=device) < cfg["rotation_p"]
    do_scale = _rand(g, b, device=device) < cfg["scale_p"]
    max_angle = math.radians(float(cfg["rotation_deg"]))
    angles = _uniform(g, (-max_angle, max_angle), b, n_angles, device=device)
    scales = _uniform(g, cfg["scale_range"], b, device=device)

    in_shape = image.shape[2:]
    out_img = image.new_empty((b, image.shape[1], *patch))
    out_seg = seg.new_empty((b, 1, *patch))
    crop = (slice(None), *_centre_index(in_shape, patch))
    centre = [s + (p - 1) / 2 for s, p in zip(_centre_start(in_shape, patch), patch, strict=True)]
    moved = (do_rot | do_scale).tolist()
    if any(moved):
        angles = torch.where(do_rot[:, None], angles, 0.0)
        scales = torch.where(do_scale, scales, 1.0)
        matrices = _affine_matrices(angles, scales, dim).to(image.dtype)
    for i in range(b):
        if not moved[i]:
            out_img[i] = image[i][crop]
            out_seg[i] = seg[i][crop]
            continue
        origin, box = _reach(matrices[i].tolist(), centre, in_shape, patch)
        grid = _box_grid(matrices[i : i + 1], centre, origin, box, patch)
        spans = (slice(o, o + s) for o, s in zip(origin, box, strict=True))
        region = (slice(i, i + 1), slice(None), *spans)
        sub = image[region]
        if n_int:
            out_img[i, :n_int] = F.grid_sample(
                sub[:, :n_int], grid, "bilinear", "zeros", align_corners=True
            )[0]
        # Labels and the previous stage's one-hot channels must stay labels: nearest neighbour
        # (exact on float copies of small integers; the copy into out_seg casts them back).
        labels = seg[region].to(image.dtype)
        out_seg[i] = F.grid_sample(labels, grid, "nearest", "zeros", align_corners=True)[0]
        if n_int < image.shape[1]:
            out_img[i, n_int:] = F.grid_sample(
                sub[:, n_int:], grid, "nearest", "zeros", align_corners=True
            )[0]
    return out_img, out_seg
