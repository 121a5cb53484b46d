"""The cascade's perturbations of the previous stage's segmentation (its one-hot channels).

Only the second stage of the cascade uses these (called by the training pipeline, not by
:func:`.batch.augment_batch`): they teach it not to trust the coarse segmentation blindly, so
they change with the cascade, not with nnU-Net's per-batch transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import Tensor

from kitsnet.train.augment.draws import _rand, _uniform


def _dilate(x: Tensor, radius: int) -> Tensor:
    """Binary dilation of (N, 1, *S) by an approximate ball of ``radius`` voxels.

    Two of every three steps grow by the face-neighbour cross, the third by the full 3^dim box:
    the Minkowski sum stays within about 6% of a Euclidean ball along the axes and diagonals.
    Outside the volume counts as background (max-pool pads with -inf).
    """
    dim = x.ndim - 2
    pool = F.max_pool3d if dim == 3 else F.max_pool2d
    for step in range(radius):
        if step % 3 == 2:
            x = pool(x, 3, stride=1, padding=1)
        else:
            grown = x
            for axis in range(dim):
                k = [1] * dim
                k[axis] = 3
                pad = [0] * dim
                pad[axis] = 1
                grown = torch.maximum(grown, pool(x, k, stride=1, padding=pad))
            x = grown
    return x


def _erode(x: Tensor, radius: int) -> Tensor:
    """Erosion as the dual of dilation; outside the volume counts as foreground, as in nnU-Net."""
    return 1 - _dilate(1 - x, radius)


_BINARY_OPS: list[Callable[[Tensor, int], Tensor]] = [
    _dilate,
    _erode,
    lambda x, r: _erode(_dilate(x, r), r),  # closing
    lambda x, r: _dilate(_erode(x, r), r),  # opening
]


def cascade_binary_ops(
    onehot: Tensor,
    generator: torch.Generator,
    p: float = 0.4,
    p_per_label: float = 0.5,
    radius: Sequence[float] = (1, 8),
) -> Tensor:
    """Randomly dilate, erode, open or close the previous stage's one-hot channels.

    Teaches the cascade's second stage not to trust the coarse segmentation blindly.  As in
    nnU-Net's ``ApplyRandomBinaryOperatorTransform``: per sample with ``p``, labels visited in
    random order, each with ``p_per_label``; voxels a label gains are removed from the other
    labels so the encoding stays one-hot.  onehot: (B, L, *S), values 0/1, any dtype.
    """
    out = onehot.clone()
    b, n_labels = onehot.shape[:2]
    dev = torch.device("cpu")
    for i in range(b):
        if float(_rand(generator, 1, device=dev)) >= p:
            continue
        order = torch.randperm(n_labels, generator=generator, device=generator.device).tolist()
        for label in order:
            if float(_rand(generator, 1, device=dev)) >= p_per_label:
                continue
            op = int(torch.randint(0, 4, (1,), generator=generator, device=generator.device))
            r = max(1, round(float(_uniform(generator, radius, 1, device=dev))))
            before = out[i, label] > 0
            after = _BINARY_OPS[op](before[None, None].float(), r)[0, 0] > 0
            added = after & ~before
            out[i, :, added] = 0
            out[i, label] = after.to(out.dtype)
    return out


def remove_random_components(
    onehot: Tensor,
    generator: torch.Generator,
    p: float = 0.2,
    p_per_label: float = 0.5,
    max_fraction: float = 0.15,
) -> Tensor:
    """Delete one random small connected component per chosen label of the previous stage.

    Mimics a coarse stage that missed a structure (e.g. a small cyst).  As in nnU-Net's
    ``RemoveRandomConnectedComponentFromOneHotEncodingTransform``: per sample with ``p``, each
    label with ``p_per_label``; only components under ``max_fraction`` of the patch are eligible,
    so a whole kidney is never removed.  Components use full (26-) connectivity, on CPU.
    """
    out = onehot.clone()
    b, n_labels, *spatial = onehot.shape
    structure = np.ones((3,) * len(spatial), dtype=bool)
    limit = max_fraction * math.prod(spatial)
    dev = torch.device("cpu")
    for i in range(b):
        if float(_rand(generator, 1, device=dev)) >= p:
            continue
        chosen = (_rand(generator, n_labels, device=dev) < p_per_label).nonzero().flatten()
        for label in chosen.tolist():
            mask = (out[i, label] > 0).cpu().numpy()
            if not mask.any():
                continue
            components, n = scipy.ndimage.label(mask, structure=structure)
            sizes = np.bincount(components.ravel())[1:]
            eligible = np.flatnonzero(sizes < limit) + 1
            if eligible.size == 0:
                continue
            pick = int(
                torch.randint(0, eligible.size, (1,), generator=generator, device=generator.device)
            )
            drop = torch.from_numpy(components == eligible[pick]).to(out.device)
            out[i, label][drop] = 0
    return out
