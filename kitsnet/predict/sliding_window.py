"""Sliding-window inference of one preprocessed volume, as nnU-Net's.

Tiles at a step of ``step`` x patch, a Gaussian importance map (sigma = ``sigma_scale`` x patch)
so tile borders weigh little, optional mirroring test-time augmentation over all spatial axes,
float32 sums.  The tiling and mirroring arithmetic lives here, apart from what is done with the
logits (export, the cascade's next stage, paste-back: :mod:`kitsnet.predict.infer`), because it
changes for other reasons (speed on a device) than those do.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from kitsnet.core.device import amp_dtype


def compute_steps(image_size: list[int], patch: list[int], step: float) -> list[list[int]]:
    """Tile starts per axis: as few tiles as needed for a step of at most ``step`` x patch,
    spread evenly so the first tile starts at 0 and the last ends at the border."""
    steps = []
    for im, pa in zip(image_size, patch, strict=True):
        target = pa * step
        n = int(np.ceil((im - pa) / target)) + 1 if im > pa else 1
        actual = (im - pa) / (n - 1) if n > 1 else 0
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


def gaussian_importance(patch: list[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights centred on the patch, max 1, with no zeros (so every voxel counts)."""
    tmp = np.zeros(patch, dtype=np.float32)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch], mode="constant", cval=0)
    g = (g / g.max()).astype(np.float32)
    g[g == 0] = g[g > 0].min()
    return g


def _mirror_sets(dim: int, axes: list[int] | None) -> list[tuple[int, ...]]:
    """Every subset of the mirror axes (the empty one, i.e. no flip, first), as nnU-Net."""
    axes = list(range(dim)) if axes is None else axes
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _mirrored_batch(x: torch.Tensor, flips: list[tuple[int, ...]]) -> torch.Tensor:
    """(B, C, *P) tiles -> (len(flips) * B, C, *P): every tile under every flip, flip-major.

    One forward pass over the whole stack instead of one per flip: on the CPU a batch of 8+
    samples keeps every convolution on oneDNN (PyTorch falls back to its much slower im2col
    ``slow_conv3d`` for batch-1 inputs with few channels, i.e. most layers below the first),
    and per-layer overheads are paid once per stack instead of once per flip.
    """
    if len(flips) == 1 and not flips[0]:
        return x
    return torch.cat([torch.flip(x, [a + 2 for a in f]) if f else x for f in flips])


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) -> the same values with channels-last strides, whatever C is.

    ``x.contiguous(memory_format=torch.channels_last_3d)`` is a no-op for a one-channel input
    (its default strides already count as channels-last) and the convolution would then keep the
    default layout; a copy into an explicitly channels-last buffer always gives channels-last
    strides, so the first convolution, and every layer after it, runs channels-last.
    """
    n, c, *spatial = x.shape
    out = torch.empty((n, *spatial, c), dtype=x.dtype, device=x.device)
    return out.permute(0, 4, 1, 2, 3).copy_(x)


def _unmirror_sum(out: torch.Tensor, flips: list[tuple[int, ...]], acc: torch.Tensor) -> None:
    """Add the (len(flips) * B, K, *P) outputs, each flipped back, into ``acc`` (B, K, *P)."""
    for f, o in zip(flips, out.unflatten(0, (len(flips), -1)), strict=True):
        acc.add_(torch.flip(o, [a + 2 for a in f]) if f else o)


def _normalisation(
    starts: list[tuple[int, ...]], patch: list[int], weight: torch.Tensor, size: tuple[int, ...]
) -> torch.Tensor:
    """Sum of the tiles' Gaussian weights at every voxel (the denominator), computed once."""
    norm = torch.zeros(size, dtype=torch.float32, device=weight.device)
    for st in starts:
        norm[tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True))] += weight
    return norm


@torch.inference_mode()
def sliding_window(
    networks: list[torch.nn.Module],
    image: np.ndarray,
    patch: list[int],
    num_classes: int,
    step: float = 0.5,
    sigma_scale: float = 0.125,
    mirror: bool = True,
    mirror_axes: list[int] | None = None,
    device: torch.device | str = "cpu",
    tile_batch: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Average logits of ``networks`` over tiles (and mirrors) -> (num_classes, *S) float32.

    ``image`` is (C, *S) with len(patch) spatial dims.  The volume is padded to at least the
    patch size and the padding removed again.  Each forward pass gets ``tile_batch`` tiles
    under every mirroring at once (``tile_batch`` x 8 samples for 3D with mirroring), which is
    what makes it fast on the CPU (see :func:`_mirrored_batch`) and peak activation memory
    grows with it.  Float32 throughout: the Gaussian-weighted sum of the tiles and the sum of
    the weights (computed once, not per tile), divided at the end.  3D on the CPU runs the
    networks on channels-last activations (faster convolutions; same logits to float32
    rounding), the networks themselves untouched.  ``progress(done, total)``, if given, is
    called after each forward pass with the tiles done so far.
    """
    dev = torch.device(device)
    dim = len(patch)
    spatial = image.shape[1:]
    pad = [max(p - s, 0) for p, s in zip(patch, spatial, strict=True)]
    pads = [(p // 2, p - p // 2) for p in pad]
    data = np.pad(image, [(0, 0), *pads], mode="constant") if any(pad) else image
    size = tuple(data.shape[1:])
    x_all = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(dev)
    flips = _mirror_sets(dim, mirror_axes) if mirror else [()]
    starts = list(itertools.product(*compute_steps(list(size), patch, step)))
    weight = torch.from_numpy(gaussian_importance(patch, sigma_scale)).to(dev)
    norm = _normalisation(starts, patch, weight, size)
    # the average over networks and flips folded into the tile weight: one multiply per tile
    tile_weight = weight / (len(networks) * len(flips))
    # 3D on the CPU: channels-last activations (only the input is converted; the weights keep
    # their layout and the networks are not modified).  oneDNN's channels-last 3D convolutions
    # are ~1.8x faster there, and kitsnet's InstanceNorm3d keeps channels-last inputs in their
    # layout (see kitsnet.model.network.InstanceNorm3d).  GPUs and 2D: unchanged.
    channels_last = dev.type == "cpu" and dim == 3
    logits = torch.zeros((num_classes, *size), dtype=torch.float32, device=dev)
    # autocast as training on this device (bf16 where the GPU has it, fp16 on older GPUs such
    # as the paper's V100s, which have no fast bf16); the sums stay float32.  CPU: float32.
    amp = amp_dtype(dev)
    for b in range(0, len(starts), tile_batch):
        chunk = starts[b : b + tile_batch]
        sl = [tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True)) for st in chunk]
        x = _mirrored_batch(torch.stack([x_all[(slice(None), *s)] for s in sl]), flips)
        if channels_last:
            x = _channels_last(x)
        pred = torch.zeros((len(chunk), num_classes, *patch), dtype=torch.float32, device=dev)
        for net in networks:
            with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                out = net(x)
            _unmirror_sum(out.float().contiguous(), flips, pred)
        pred.mul_(tile_weight)
        for s, p in zip(sl, pred, strict=True):
            logits[(slice(None), *s)] += p
        if progress is not None:
            progress(min(b + tile_batch, len(starts)), len(starts))
    logits /= norm
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial, strict=True))
    return logits[(slice(None), *crop)].cpu().numpy()
