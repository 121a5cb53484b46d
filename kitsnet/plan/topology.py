"""The U-Net's shape as nnU-Net's planner derives it from a target spacing and a patch.

nnU-Net does not let a user pick the depth of a network: it follows from the patch and the
spacing.  Every axis is halved while its feature map stays at least ``2 x MIN_EDGE`` voxels and
its spacing is within a factor 2 of the finest poolable axis (so a thick-slice axis waits until
the in-plane axes have caught up); the last lone axis is only halved while it is at least
``3 x MIN_EDGE``.  A convolution kernel is 3 along an axis once its spacing is within a factor 2
of the finest, 1 before, and the bottleneck's kernel is always 3.  The patch is then rounded up
to a multiple of 2^(poolings) per axis.  For the paper's 128^3 patch at 0.78 mm that is five
poolings: six stages, 128 -> 4 voxels at the bottleneck (the paper's "five resolution steps").

When a plan asks for ``auto`` patch or batch sizes, :func:`fit_patch` and
:func:`batch_size_for` follow the rest of nnU-Net v2's
``ExperimentPlanner.get_plans_for_configuration``: a patch with the spacing's aspect ratio and
the volume of 256^3 (2D: 2048^2), clipped to the median image, shrunk one axis at a time until
the network's feature maps fit a GPU memory budget, and the batch size that budget leaves.
``tests/nnunet/test_plan_nnunet.py`` runs nnU-Net's planner on real KiTS21 geometry and compares
both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MIN_EDGE = 4  # nnU-Net's UNet_featuremap_min_edge_length: the bottleneck is at least 4 voxels
# nnU-Net v2's memory proxy: the number of feature-map values one training sample produces,
# with the reference values its planner was calibrated on (8 GB, batch 2 in 3D, 12 in 2D).
REFERENCE_VALUES = {3: 560_000_000, 2: 85_000_000}
REFERENCE_GB = 8.0
REFERENCE_BATCH = {3: 2, 2: 12}
INITIAL_EDGE = {3: 256, 2: 2048}  # the initial patch has the volume of INITIAL_EDGE^dim
MIN_BATCH = 2
MAX_DATASET_FRACTION = 0.05  # one batch never covers more than 5% of the dataset's voxels


@dataclass(frozen=True)
class Topology:
    """Strides (stage 0 first, always ones), conv kernels per stage and the rounded patch."""

    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    patch_size: list[int]

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    @property
    def divisor(self) -> list[int]:
        """What each axis of the patch must be a multiple of: 2^(poolings along it)."""
        return [math.prod(s[a] for s in self.strides) for a in range(len(self.patch_size))]


def round_up(values: Sequence[int], multiples: Sequence[int]) -> list[int]:
    return [int(math.ceil(v / m) * m) for v, m in zip(values, multiples, strict=True)]


def pool_and_conv_props(
    spacing: Sequence[float], patch_size: Sequence[int], min_edge: int = MIN_EDGE
) -> Topology:
    """nnU-Net's topology rule (see the module docstring) for one spacing and patch."""
    dim = len(spacing)
    current = [float(s) for s in spacing]
    size = [float(p) for p in patch_size]
    kernel = [1] * dim
    strides, kernels = [[1] * dim], []
    while True:
        axes = [a for a in range(dim) if size[a] >= 2 * min_edge]
        if not axes:
            break
        finest = min(current[a] for a in axes)
        axes = [a for a in axes if current[a] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_edge:
            break
        kernel = [3 if k == 3 or current[a] / min(current) < 2 else 1 for a, k in enumerate(kernel)]
        strides.append([2 if a in axes else 1 for a in range(dim)])
        kernels.append(list(kernel))
        for a in axes:
            current[a] *= 2
            size[a] = math.ceil(size[a] / 2)
    kernels.append([3] * dim)
    unrounded = Topology(strides, kernels, [int(p) for p in patch_size])
    return Topology(strides, kernels, round_up(unrounded.patch_size, unrounded.divisor))


def feature_map_values(
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    features: Sequence[int],
    num_classes: int,
    n_conv: int = 2,
    n_conv_decoder: int = 2,
) -> int:
    """Feature-map values of one sample through the U-Net with deep supervision: nnU-Net's
    proxy for training memory (``compute_conv_feature_map_size``), counted from the plan.

    Encoder stage s: ``n_conv`` outputs of ``features[s]`` channels at that stage's size.  Every
    decoder stage (at the size of the skip it joins): the transposed convolution's output,
    ``n_conv_decoder`` convolutions and a segmentation head.
    """
    sizes, size = [], list(patch_size)
    for stride in strides:
        size = [s // t for s, t in zip(size, stride, strict=True)]
        sizes.append(math.prod(size))
    encoder = sum(n_conv * f * v for f, v in zip(features, sizes, strict=True))
    decoder = sum(
        ((n_conv_decoder + 1) * f + num_classes) * v
        for f, v in zip(features[:-1], sizes[:-1], strict=True)
    )
    return int(encoder + decoder)


def _initial_patch(spacing: Sequence[float], median_shape: Sequence[float]) -> list[int]:
    """A patch with the spacing's aspect ratio (isotropic in mm), INITIAL_EDGE^dim voxels,
    clipped to the median image."""
    dim = len(spacing)
    inv = [1 / s for s in spacing]
    scale = (INITIAL_EDGE[dim] ** dim / math.prod(inv)) ** (1 / dim)
    return [min(round(i * scale), m) for i, m in zip(inv, median_shape, strict=True)]


def fit_patch(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    features: Callable[[int], list[int]],
    num_classes: int,
    gpu_memory_gb: float = REFERENCE_GB,
) -> Topology:
    """The largest patch (and its topology) whose feature maps fit ``gpu_memory_gb`` at batch 2,
    as nnU-Net v2's planner chooses it.

    ``features(n_stages)`` gives the widths for a network of that depth (the plan's widths: the
    memory proxy counts them).  The axis shrunk next is the one largest relative to the median
    image (the last one on ties); it shrinks by its current multiple, recomputed for the smaller
    patch, so no valid size is skipped.
    """
    dim = len(spacing)
    budget = _budget(dim, gpu_memory_gb)
    topo = pool_and_conv_props(spacing, _initial_patch(spacing, median_shape))
    while _cost(topo, features, num_classes) / REFERENCE_BATCH[dim] * MIN_BATCH > budget:
        ratios = [p / m for p, m in zip(topo.patch_size, median_shape, strict=True)]
        axis = max(range(dim), key=lambda a: (ratios[a], a))
        smaller = list(topo.patch_size)
        smaller[axis] -= topo.divisor[axis]
        patch = list(topo.patch_size)
        patch[axis] -= pool_and_conv_props(spacing, smaller).divisor[axis]
        topo = pool_and_conv_props(spacing, patch)
    return topo


def batch_size_for(
    topo: Topology,
    features: Callable[[int], list[int]],
    num_classes: int,
    dataset_voxels: float,
    gpu_memory_gb: float = REFERENCE_GB,
) -> int:
    """nnU-Net's batch size: what the memory budget leaves for this topology, at least 2 and
    at most 5% of ``dataset_voxels`` (the median image times the number of cases) per batch."""
    dim = len(topo.patch_size)
    batch = round(
        _budget(dim, gpu_memory_gb) / _cost(topo, features, num_classes) * REFERENCE_BATCH[dim]
    )
    cap = round(dataset_voxels * MAX_DATASET_FRACTION / math.prod(topo.patch_size))
    return max(min(batch, cap), MIN_BATCH)


def _budget(dim: int, gpu_memory_gb: float) -> float:
    return REFERENCE_VALUES[dim] * gpu_memory_gb / REFERENCE_GB


def _cost(topo: Topology, features: Callable[[int], list[int]], num_classes: int) -> int:
    return feature_map_values(topo.patch_size, topo.strides, features(topo.n_stages), num_classes)
