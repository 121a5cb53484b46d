"""The augmentation settings and nnU-Net's defaults for them.

Kept apart from the transforms because the settings change with nnU-Net's trainer defaults
and the experiment configs, not with how the transforms are computed.
"""

from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, Any] = {
    "rotation_p": 0.2,
    "rotation_deg": 30.0,  # 3D, per axis; 2D uses 180 unless the config says otherwise
    "scale_p": 0.2,
    "scale_range": [0.7, 1.4],  # > 1 samples a larger region: objects get smaller
    "noise_p": 0.1,
    "noise_var": [0.0, 0.1],  # nnU-Net calls it a variance but uses it as the std
    "blur_p": 0.2,
    "blur_sigma": [0.5, 1.0],
    "brightness_p": 0.15,
    "brightness_range": [0.75, 1.25],
    "contrast_p": 0.15,
    "contrast_range": [0.75, 1.25],
    "lowres_p": 0.25,
    "lowres_zoom": [0.5, 1.0],
    "gamma_p": 0.3,
    "gamma_inv_p": 0.1,
    "gamma_range": [0.7, 1.5],
    "mirror_p": 0.5,
    "mirror_axes": None,  # None: every spatial axis
}


def default_config(dim: int) -> dict[str, Any]:
    """nnU-Net's defaults for a 2D or 3D network (2D rotates in-plane by up to 180 degrees)."""
    cfg = dict(DEFAULTS)
    if dim == 2:
        cfg["rotation_deg"] = 180.0
    return cfg
