"""The random draws every transform makes, all from one ``torch.Generator``.

A seed reproduces a batch exactly only if every transform draws the same numbers in the same
order on every device; these helpers fix how that happens (draws on the generator's device,
then moved), so a change here changes every augmented batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _rand(g: torch.Generator, *shape: int, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on ``device``."""
    return torch.rand(shape, generator=g, device=g.device).to(device)


def _uniform(
    g: torch.Generator, lo_hi: Sequence[float], *shape: int, device: torch.device
) -> Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + (hi - lo) * _rand(g, *shape, device=device)


def _bg_contrast(
    g: torch.Generator, lo_hi: Sequence[float], *shape: int, device: torch.device
) -> Tensor:
    """nnU-Net's ``BGContrast``: half the draws below 1, half above, so shrinking and growing
    are equally likely although the range is not symmetric around 1."""
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    below = _rand(g, *shape, device=device) < 0.5
    low = _uniform(g, (lo, 1.0), *shape, device=device)
    high = _uniform(g, (max(lo, 1.0), hi), *shape, device=device)
    return torch.where(below & (lo < 1), low, high)


def _device_generator(g: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``g``: big noise fields are drawn where they live."""
    if g.device == device:
        return g
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())
    return torch.Generator(device=device).manual_seed(seed)
