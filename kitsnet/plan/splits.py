"""The cross-validation splits: which cases each fold trains and validates on.

They are written once (``splits`` rule) and read by training, prediction, evaluation and the
figures, so every stage agrees on which fold held out which case.  A splits file given in the
config (for example nnU-Net's own ``splits_final.json``) replaces the computed folds.
"""

from __future__ import annotations

import numpy as np

from kitsnet.core.io import KitsnetError, load_json

__all__ = ["load_or_make_splits", "make_splits"]


def make_splits(cases: list[str], n_folds: int = 5, seed: int = 12345) -> list[dict]:
    """sklearn ``KFold(n_splits, shuffle=True, random_state=seed)`` over sorted case ids.

    Re-implemented (not imported) so the workflow needs no scikit-learn, with the same
    arithmetic: a ``RandomState(seed)`` shuffle of the indices, the first ``n % k`` folds one
    larger, and train/val lists in sorted order; nnU-Net v2 builds its splits the same way.
    """
    keys = np.sort(np.array(cases))
    n = len(keys)
    if n < n_folds:
        raise ValueError(f"{n} cases cannot be split into {n_folds} folds")
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    splits, start = [], 0
    for size in sizes:
        val_mask = np.zeros(n, bool)
        val_mask[idx[start : start + size]] = True
        start += size
        splits.append({"train": keys[~val_mask].tolist(), "val": keys[val_mask].tolist()})
    return splits


def load_or_make_splits(
    cases: list[str], n_folds: int, seed: int, splits_file: str | None = None
) -> list[dict]:
    """An existing splits file is honoured (checked against the cases), else KFold splits."""
    if not splits_file:
        return make_splits(cases, n_folds, seed)
    splits = load_json(splits_file)
    if len(splits) != n_folds:
        raise KitsnetError(f"{splits_file}: {len(splits)} folds, config says folds={n_folds}")
    val = sorted(c for s in splits for c in s["val"])
    if val != sorted(cases):
        raise KitsnetError(
            f"{splits_file}: validation cases do not cover the dataset's cases exactly once"
        )
    return splits
