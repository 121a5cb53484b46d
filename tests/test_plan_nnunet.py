"""Cross-validation splits against nnU-Net v2's ``generate_crossval_split``.

Needs the optional ``peer`` extra; skipped without it.  nnU-Net's trainer splits the sorted case
identifiers with ``generate_crossval_split(keys, seed=12345, n_splits=5)`` (sklearn KFold,
shuffled); ``kitsnet.plan.make_splits`` re-implements it without scikit-learn.  The folds must be
identical, train and validation lists in the same order, also when the number of cases is not a
multiple of the number of folds.
"""

from __future__ import annotations

import pytest

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is only installed with the 'peer' extra")
from nnunetv2.utilities.crossval_split import generate_crossval_split  # noqa: E402

from kitsnet.plan import make_splits  # noqa: E402


@pytest.mark.parametrize("n", [5, 7, 10, 13, 24, 300])
def test_splits_equal_nnunets(n: int) -> None:
    # KiTS21 ids, given out of order: both sides split the sorted list
    cases = [f"case_{i:05d}" for i in range(n)][::-1]
    ref = generate_crossval_split(sorted(cases), seed=12345, n_splits=5)
    ours = make_splits(cases, n_folds=5, seed=12345)
    assert ours == [{"train": list(s["train"]), "val": list(s["val"])} for s in ref]


@pytest.mark.parametrize(("n", "folds", "seed"), [(11, 3, 0), (23, 4, 7)])
def test_splits_equal_nnunets_for_other_folds_and_seeds(n: int, folds: int, seed: int) -> None:
    cases = [f"case_{i:05d}" for i in range(n)]
    ref = generate_crossval_split(cases, seed=seed, n_splits=folds)
    assert make_splits(cases, folds, seed) == [
        {"train": list(s["train"]), "val": list(s["val"])} for s in ref
    ]
