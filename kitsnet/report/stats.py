"""How far to trust Table 1: spread, intervals and paired tests for every (configuration, metric).

Table 1 of the paper gives one mean per cell.  Whether our number differs from the paper's, or
one configuration from another, depends on how much that mean would move with other cases and
other splits; this module computes that from the per-case out-of-fold scores that
:func:`kitsnet.report.table1.collate` pools (long format: ``model, fold, case, metric, value``).

Per cell:

* ``mean``: mean over cases, NaN scores skipped -- the number in ``table1.csv``.  (The KiTS21
  evaluation scores a region absent from both reference and prediction as 1, not NaN, see
  :mod:`kitsnet.evaluate.metrics`; a NaN only comes from a score file that left a value
  undefined, and every statistic here drops it the way the mean does.)
* ``fold_sd``: standard deviation of the per-fold means, ``ddof=1`` (see :func:`fold_sd`).
* ``ci_low``, ``ci_high``: percentile bootstrap interval of the mean over cases
  (see :func:`bootstrap_means` for the exact resampling scheme, which tests reproduce).
* ``paper_in_ci``: whether the paper's value lies inside that interval.
* ``p_vs_cascade``: two-sided Wilcoxon signed-rank test against ``3d_cascade_fullres``, paired
  on case id (see :func:`wilcoxon_p`).
* ``p_vs_labels``: for a region-based configuration (``<base>_regions``,
  :func:`kitsnet.stages.is_region_based`), the same test against its label-based base
  (:func:`kitsnet.stages.base_configuration`: ``3d_fullres_regions`` against ``3d_fullres``, the
  same network, data and training on the labels instead of the regions); NaN for a label-based
  configuration and when the base was not run.

The bootstrap resamples cases with the trained models fixed: it measures how much the mean
depends on which cases were scored, not how much it would change with retraining (``fold_sd``
gives a rough sense of that).  No correction for multiple comparisons is applied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from kitsnet.stages import base_configuration, is_region_based

__all__ = [
    "STATS_COLUMNS",
    "REFERENCE_CONFIG",
    "StatsSettings",
    "cell_values",
    "fold_sd",
    "bootstrap_means",
    "bootstrap_ci",
    "paper_in_ci",
    "wilcoxon_p",
    "table1_stats",
]

STATS_COLUMNS = [
    "model",
    "metric",
    "mean",
    "fold_sd",
    "ci_low",
    "ci_high",
    "paper",
    "paper_in_ci",
    "p_vs_cascade",
    "p_vs_labels",
]
# The paper's best configuration, against which every other is tested.
REFERENCE_CONFIG = "3d_cascade_fullres"


@dataclass(frozen=True)
class StatsSettings:
    """What the statistics depend on besides the scores, so the report can state it.

    ``seed`` comes from the caller (the workflow's ``seed``): the same scores and seed give the
    same intervals on every run.  10,000 resamples put the Monte-Carlo error of a 95% percentile
    endpoint well below the 4th decimal Table 1 is printed with for a few hundred cases.
    """

    seed: int
    n_resamples: int = 10_000
    level: float = 0.95
    reference: str = REFERENCE_CONFIG


def cell_values(per_case: pd.DataFrame, model: str, metric: str) -> pd.DataFrame:
    """The finite scores of one cell as ``case, fold, value``, sorted by case id.

    NaN scores are dropped here, once, so that the mean, the fold SD, the bootstrap and the
    test all use the same cases as Table 1's mean (which skips NaN).  Sorting by case makes the
    bootstrap's resampled indices refer to the same cases whatever order the input had.
    """
    sel = per_case[(per_case["model"] == model) & (per_case["metric"] == metric)]
    sel = sel[np.isfinite(sel["value"].to_numpy(dtype=float))]
    out = sel[["case", "fold", "value"]].astype({"value": float})
    return out.sort_values("case", kind="stable").reset_index(drop=True)


def fold_sd(values: pd.Series, folds: pd.Series) -> float:
    """Standard deviation of the per-fold means, with ``ddof=1``.

    The 5 folds are a sample of the ways the cases could have been split, and what a reader
    wants is the spread a fold's mean has around the overall mean: the sample standard deviation
    (``ddof=1``, the square root of the unbiased variance) estimates that, where ``ddof=0``
    (numpy's default) would understate it by sqrt(4/5) for 5 folds.  It is also what
    "mean ± SD over folds" means in the segmentation literature.  Folds without a finite score
    do not count; fewer than two folds give NaN.
    """
    means = pd.Series(np.asarray(values, float)).groupby(np.asarray(folds)).mean().dropna()
    return float(means.std(ddof=1)) if len(means) >= 2 else math.nan


def bootstrap_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` bootstrap resamples of ``values`` (cases drawn with replacement).

    The scheme, exactly (tests rebuild it with a plain loop): ``rng = np.random.default_rng(seed)``;
    ``idx = rng.integers(0, n, size=(n_resamples, n))`` in that one call (numpy draws bounded
    integers from a buffer, so splitting the call would change the stream); resample ``r`` is
    ``values[idx[r]]`` and its statistic the plain mean.  One gather and one row mean over the
    whole ``(n_resamples, n)`` matrix: 10,000 x 300 cases take some tens of milliseconds.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_means: need a non-empty 1-D array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(int(n_resamples), values.size))
    return values[idx].mean(axis=1)


def bootstrap_ci(
    values: np.ndarray, seed: int, n_resamples: int = 10_000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of :func:`bootstrap_means`, numpy's default (linear) interpolation.

    The percentile interval needs no normality of the scores, which Dice is far from (piled up
    near 1 with a tail of failures).  No finite value: ``(nan, nan)``.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    means = bootstrap_means(values, n_resamples, seed)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def paper_in_ci(paper: float, low: float, high: float) -> bool | None:
    """``low <= paper <= high`` (endpoints included); ``None`` when any of them is NaN, so a
    configuration the paper did not run is "not applicable", never "no"."""
    if any(math.isnan(v) for v in (paper, low, high)):
        return None
    return bool(low <= paper <= high)


def wilcoxon_p(scores: pd.Series, reference: pd.Series) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of ``scores - reference``, paired on
    the index (case id).

    Cases missing or NaN on either side are dropped (the same cases Table 1's means skip), so the
    test compares the two configurations on the cases both were scored on.  Zero differences are
    dropped (scipy's ``zero_method="wilcox"``: a case where both agree says nothing about which
    is better); all differences zero gives p = 1.0 (scipy would return NaN), no common case NaN.
    ``method="auto"``: exact null distribution for up to 50 differences without ties, otherwise
    scipy's tie-corrected normal approximation (exhaustive permutations up to 13 with ties).
    Differences are rounded to 12 decimals first, so floating-point noise does not split ties.
    """
    both = pd.concat([scores.rename("x"), reference.rename("y")], axis=1, join="inner")
    both = both[np.isfinite(both["x"].to_numpy(float)) & np.isfinite(both["y"].to_numpy(float))]
    if both.empty:
        return math.nan
    # rounded so that equal gaps tie and equal scores give 0 despite the subtraction's rounding
    # noise (1.0 - 0.9 != 0.9 - 0.8 in binary floating point); scores carry far fewer digits
    diff = np.round(both["x"].to_numpy(float) - both["y"].to_numpy(float), 12)
    if not np.any(diff != 0):
        return 1.0
    return float(wilcoxon(diff, alternative="two-sided", zero_method="wilcox").pvalue)


def table1_stats(
    per_case: pd.DataFrame,
    paper: Mapping[str, Mapping[str, float]],
    settings: StatsSettings,
) -> pd.DataFrame:
    """One row per (configuration, metric) with :data:`STATS_COLUMNS`.

    Rows follow ``per_case``'s order of configurations and of metrics (``collate`` already puts
    them in Table 1's order).  ``paper[model][metric]`` is the value to check against the
    interval (NaN or absent: no paper value).  Every cell's bootstrap starts from the same
    ``settings.seed``, so a cell's interval does not depend on which other cells exist.
    ``p_vs_cascade`` is NaN for the reference configuration itself and for every row when the
    reference was not run.  ``p_vs_labels`` pairs a region-based configuration with its
    label-based base; NaN for a label-based row and when the base was not run.
    """
    models = list(pd.unique(per_case["model"]))
    metrics = list(pd.unique(per_case["metric"]))
    # every cell's finite scores indexed by case, once (the reference and a base are read again)
    scores = {
        (model, metric): cell_values(per_case, model, metric).set_index("case")["value"]
        for model in {*models, settings.reference}
        for metric in metrics
    }

    def paired_p(model: str, other: str, metric: str) -> float:
        """Wilcoxon p of ``model`` against ``other``; NaN when ``other`` has no finite score."""
        against = scores.get((other, metric))
        if against is None or against.empty:
            return math.nan
        return wilcoxon_p(scores[model, metric], against)

    rows = []
    for model in models:
        for metric in metrics:
            cell = cell_values(per_case, model, metric)
            low, high = bootstrap_ci(
                cell["value"].to_numpy(), settings.seed, settings.n_resamples, settings.level
            )
            value = float(paper.get(model, {}).get(metric, math.nan))
            p_cascade = (
                paired_p(model, settings.reference, metric)
                if model != settings.reference
                else math.nan
            )
            p_labels = (
                paired_p(model, base_configuration(model), metric)
                if is_region_based(model)
                else math.nan
            )
            rows.append(
                {
                    "model": model,
                    "metric": metric,
                    "mean": float(cell["value"].mean()) if len(cell) else math.nan,
                    "fold_sd": fold_sd(cell["value"], cell["fold"]),
                    "ci_low": low,
                    "ci_high": high,
                    "paper": value,
                    "paper_in_ci": paper_in_ci(value, low, high),
                    "p_vs_cascade": p_cascade,
                    "p_vs_labels": p_labels,
                }
            )
    return pd.DataFrame(rows, columns=STATS_COLUMNS)
