"""The dataset fingerprint: spacings, shapes and foreground-intensity statistics of the cases.

It is the planner's only view of the data (:mod:`kitsnet.plan.planner` reads nothing else), so
it is computed once per dataset by the ``fingerprint`` rule and written to a JSON file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kitsnet.core.io import load_volume

__all__ = ["fingerprint"]


def fingerprint(
    pairs: list[tuple[str, str | Path, str | Path]], samples_per_case: int = 10000, seed: int = 1234
) -> dict:
    """Spacings, shapes and foreground-intensity statistics of the dataset.

    Foreground voxels (label > 0) are subsampled per case with a fixed seed, as nnU-Net does,
    so the statistics are deterministic and cheap to hold in memory for 300 cases.
    """
    rng = np.random.default_rng(seed)
    spacings, shapes, samples = [], [], []
    for case, image_file, label_file in pairs:
        img = load_volume(image_file, case)
        lab = load_volume(label_file, case)
        spacings.append(list(img.spacing))
        shapes.append(list(img.array.shape))
        fg = np.asarray(img.array)[np.asarray(lab.array) > 0].astype(np.float64)
        if fg.size:
            take = min(samples_per_case, fg.size)
            samples.append(rng.choice(fg, size=take, replace=False))
    values = np.concatenate(samples) if samples else np.zeros(1)
    return {
        "cases": [case for case, _, _ in pairs],
        "spacings": spacings,
        "shapes": shapes,
        "median_spacing": np.median(np.array(spacings), axis=0).tolist(),
        "median_shape": np.median(np.array(shapes), axis=0).tolist(),
        "foreground_intensity": {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "percentile_00_5": float(np.percentile(values, 0.5)),
            "percentile_99_5": float(np.percentile(values, 99.5)),
            "min": float(values.min()),
            "max": float(values.max()),
            "n_samples": int(values.size),
        },
    }
