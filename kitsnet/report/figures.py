"""The paper's figures (1: reference labels, 2: predictions; our 3: per-case Dice), the
training curves and a fold's progress plot, from the pipeline's outputs.

Everything here reads files that earlier stages wrote (training logs, NIfTI volumes) or tables
that :mod:`kitsnet.report.table1` collated, from explicit paths handed in by the workflow, and
writes PNGs atomically without a version string or timestamp, so a rerun on the same inputs
(with the same matplotlib) gives identical files.  Arrays are in nibabel order
``(slices, rows, cols)``: an axial slice is ``array[k]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from kitsnet.core.io import KitsnetError, atomic_path, load_volume  # noqa: E402
from kitsnet.data.dataset import LABELS  # noqa: E402
from kitsnet.report.table1 import (  # noqa: E402
    PAPER_EQUIVALENT,
    config_rank,
    order_configs,
    read_csv,
)
from kitsnet.train.training_log import EPOCH_TIME_COLUMN, LOG_COLUMNS  # noqa: E402

__all__ = [
    "DICE_REGIONS",
    "plot_reference",
    "plot_predictions",
    "plot_per_case",
    "plot_training_curves",
    "plot_progress",
]

# Figure 1 colours of the paper: kidney blue, tumour orange, cyst green (label -> RGB).
LABEL_COLOURS = {1: (0.12, 0.47, 0.90), 2: (1.0, 0.55, 0.0), 3: (0.15, 0.75, 0.25)}
HU_WINDOW = (-200.0, 300.0)
DICE_REGIONS = {"dice_kidney": "kidney", "dice_masses": "masses", "dice_tumor": "tumor"}
_PNG_META = {"Software": None}  # no version string, so reruns compare equal
# The curves plot no time, so a log without the wall-clock column still plots; the progress
# plot (plot_progress) needs every column.
_CURVE_COLUMNS = [c for c in LOG_COLUMNS if c != EPOCH_TIME_COLUMN]


def _pick_slices(ref: np.ndarray) -> list[int]:
    """The axial slice with the most tumour (else most foreground), plus the most-cyst slice."""
    counts = {lab: (ref == lab).sum(axis=(1, 2)) for lab in (2, 3)}
    main = counts[2] if counts[2].any() else (ref > 0).sum(axis=(1, 2))
    picks = [int(np.argmax(main))]
    if counts[3].any() and int(np.argmax(counts[3])) != picks[0]:
        picks.append(int(np.argmax(counts[3])))
    return picks


def _overlay(ax: plt.Axes, ct: np.ndarray, lab: np.ndarray | None, aspect: float) -> None:
    """CT in a soft-tissue window with semi-transparent label colours on top."""
    ax.imshow(ct, cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1], aspect=aspect)
    if lab is not None:
        rgba = np.zeros((*lab.shape, 4))
        for value, colour in LABEL_COLOURS.items():
            rgba[lab == value] = (*colour, 0.45)
        ax.imshow(rgba, aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _load_pair(case: str, image: Path, ref: Path) -> tuple[np.ndarray, np.ndarray, float]:
    img, seg = load_volume(image, case), load_volume(ref, case)
    if img.array.shape != seg.array.shape:
        raise KitsnetError(f"{case}: {image} {img.array.shape} vs {ref} {seg.array.shape}")
    # imshow's aspect is pixel height / width, i.e. row spacing / column spacing.
    return np.asarray(img.array, float), np.asarray(seg.array), img.spacing[1] / img.spacing[2]


def _legend(fig: plt.Figure) -> None:
    """Label colours once per figure, in a strip kept free below the panels."""
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    handles = [Patch(color=LABEL_COLOURS[v], label=LABELS[v]) for v in LABEL_COLOURS]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)


def _save(fig: plt.Figure, out_png: Path) -> None:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=_PNG_META)
    plt.close(fig)


def plot_reference(cases: list[tuple[str, Path, Path]], out_png: Path) -> None:
    """Figure 1: for each (case, image, reference), CT and CT + reference on selected slices."""
    rows = []
    for case, image, ref in cases:
        ct, seg, aspect = _load_pair(case, Path(image), Path(ref))
        rows += [(case, k, ct[k], seg[k], aspect) for k in _pick_slices(seg)]
    fig, axes = plt.subplots(len(rows), 2, figsize=(6, 3 * len(rows) + 0.5), squeeze=False)
    for (case, k, ct, seg, aspect), (ax_ct, ax_seg) in zip(rows, axes, strict=True):
        _overlay(ax_ct, ct, None, aspect)
        _overlay(ax_seg, ct, seg, aspect)
        ax_ct.set_ylabel(f"{case}\nslice {k}", fontsize=8)
    axes[0, 0].set_title("CT", fontsize=9)
    axes[0, 1].set_title("Reference", fontsize=9)
    _legend(fig)
    _save(fig, out_png)


def plot_predictions(
    cases: list[str],
    image_paths: Mapping[str, Path],
    ref_paths: Mapping[str, Path],
    pred_paths: Mapping[str, Mapping[str, Path]],
    out_png: Path,
) -> None:
    """Figure 2: reference and each configuration's prediction side by side on the same slices.

    ``image_paths``/``ref_paths`` map case -> file; ``pred_paths`` maps config -> case -> file.
    Slices are chosen from the reference (as in Figure 1) so every column shows the same anatomy.
    """
    configs = order_configs(pred_paths)
    rows = []
    for case in cases:
        ct, seg, aspect = _load_pair(case, Path(image_paths[case]), Path(ref_paths[case]))
        preds = {}
        for config in configs:
            if case not in pred_paths[config]:
                raise KitsnetError(f"{case}: no prediction given for {config}")
            pred = load_volume(pred_paths[config][case], case).array
            if pred.shape != seg.shape:
                raise KitsnetError(f"{case}: {pred_paths[config][case]} shape {pred.shape}")
            preds[config] = np.asarray(pred)
        for k in _pick_slices(seg):
            rows.append((case, k, ct[k], [seg[k], *(preds[c][k] for c in configs)], aspect))
    titles = ["Reference", *configs]
    fig, axes = plt.subplots(
        len(rows), len(titles), figsize=(2.5 * len(titles), 2.5 * len(rows) + 0.5), squeeze=False
    )
    for (case, k, ct, labels, aspect), row_axes in zip(rows, axes, strict=True):
        for ax, lab in zip(row_axes, labels, strict=True):
            _overlay(ax, ct, lab, aspect)
        row_axes[0].set_ylabel(f"{case}\nslice {k}", fontsize=8)
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title, fontsize=9)
    _legend(fig)
    _save(fig, out_png)


def _strip_box(ax: plt.Axes, x: int, values: np.ndarray, rng: np.random.Generator) -> None:
    """A box (quartiles, whiskers at 1.5 IQR) with every case on top as a jittered point, and
    the mean, which is what Table 1 reports (the box shows the median)."""
    ax.boxplot(
        values,
        positions=[x],
        widths=0.6,
        showfliers=False,  # every case is drawn as a point anyway
        medianprops={"color": "black"},
        boxprops={"color": "0.35"},
        whiskerprops={"color": "0.35"},
        capprops={"color": "0.35"},
    )
    jitter = rng.uniform(-0.2, 0.2, size=values.size)
    ax.scatter(x + jitter, values, s=9, color="C0", alpha=0.5, lw=0, zorder=3)
    ax.scatter([x], [values.mean()], marker="^", s=40, color="black", zorder=4)


def plot_per_case(
    per_case: pd.DataFrame, paper: Mapping[str, Mapping[str, float]], out_png: Path
) -> None:
    """Figure 3: per-case Dice of every configuration, one panel per region (kidney, masses,
    tumor), with the paper's mean for that configuration and region marked beside ours.

    ``per_case`` is the long table of :func:`kitsnet.report.table1.collate` (``model, fold, case,
    metric, value``); NaN scores are left out, as in Table 1's means.  ``paper[model][metric]``
    is the value to mark (NaN or absent: none, as for a region-based ``<configuration>_regions``,
    which the paper did not train); a configuration compared with another's paper row
    (:data:`kitsnet.report.table1.PAPER_EQUIVALENT`) gets a dashed mark.  Any number of
    configurations, one box each in :func:`~kitsnet.report.table1.order_configs`'s order (the
    figure widens with them).  A table's mean hides
    whether a configuration fails on a few cases or is a little worse on all of them; this shows
    which.  The jitter is seeded, so the PNG is the same on every run.
    """
    models = order_configs(per_case["model"])
    if not models:
        raise KitsnetError("plot_per_case: no per-case scores given")
    width = 1.2 + 0.75 * len(models)
    fig, axes = plt.subplots(1, len(DICE_REGIONS), figsize=(width * len(DICE_REGIONS), 4.6))
    for ax, (metric, region) in zip(axes, DICE_REGIONS.items(), strict=True):
        rng = np.random.default_rng(0)
        sel = per_case[per_case["metric"] == metric]
        labels = []
        for x, model in enumerate(models):
            values = sel.loc[sel["model"] == model, "value"].to_numpy(float)
            values = values[np.isfinite(values)]
            labels.append(f"{model} (n={values.size})")
            if values.size:
                _strip_box(ax, x, values, rng)
            ref = float(paper.get(model, {}).get(metric, np.nan))
            if np.isfinite(ref):
                ls = "--" if model in PAPER_EQUIVALENT else "-"
                ax.hlines(ref, x - 0.38, x + 0.38, colors="C3", lw=2, ls=ls, zorder=5)
        ax.set_xticks(range(len(models)), labels, rotation=30, ha="right", fontsize=8)
        ax.set(title=f"Dice {region}", xlim=(-0.6, len(models) - 0.4), ylim=(-0.03, 1.03))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Dice per case (out-of-fold)")
    handles = [
        Line2D([], [], marker="^", ls="", color="black", label="mean (Table 1)"),
        Line2D([], [], color="C3", lw=2, label="paper, Table 1"),
    ]
    for model in (m for m in models if m in PAPER_EQUIVALENT):
        label = f"paper, {PAPER_EQUIVALENT[model]} row (for {model})"
        handles.append(Line2D([], [], color="C3", lw=2, ls="--", label=label))
    axes[0].legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.9)
    fig.tight_layout()
    _save(fig, out_png)


def plot_training_curves(logs: dict[tuple[str, int], Path], out_png: Path) -> None:
    """One panel per configuration: losses (left axis) and EMA pseudo-Dice (right) per fold."""
    by_config: dict[str, list[tuple[int, pd.DataFrame]]] = {}
    for (config, fold), path in sorted(logs.items()):
        config_rank(config, path)
        by_config.setdefault(config, []).append((fold, read_csv(path, _CURVE_COLUMNS, "log")))
    configs = order_configs(by_config)
    if not configs:
        raise KitsnetError("plot_training_curves: no training logs given")
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, config in zip(axes[0], configs, strict=True):
        twin = ax.twinx()
        for fold, df in by_config[config]:
            colour = f"C{fold % 10}"
            ax.plot(df["epoch"], df["train_loss"], color=colour, lw=1, label=f"fold {fold}")
            ax.plot(df["epoch"], df["val_loss"], color=colour, lw=1, ls="--")
            twin.plot(df["epoch"], df["ema_pseudo_dice"], color=colour, lw=1, ls=":")
        ax.set(title=config, xlabel="epoch", ylabel="loss (solid train, dashed val)")
        twin.set(ylabel="EMA pseudo-Dice (dotted)", ylim=(0, 1))
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    _save(fig, out_png)


def plot_progress(log_csv: Path, out_png: Path) -> None:
    """One fold's progress plot (like nnU-Net's progress.png): losses/Dice, epoch time, lr."""
    df = read_csv(Path(log_csv), LOG_COLUMNS, "log")
    fig, (ax, ax_t, ax_lr) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax.plot(df["epoch"], df["train_loss"], color="C0", label="train loss")
    ax.plot(df["epoch"], df["val_loss"], color="C1", label="val loss")
    twin = ax.twinx()
    twin.plot(df["epoch"], df["pseudo_dice"], color="C2", ls=":", label="pseudo Dice")
    twin.plot(df["epoch"], df["ema_pseudo_dice"], color="C2", label="pseudo Dice (EMA)")
    twin.set(ylabel="pseudo Dice", ylim=(0, 1))
    ax.set_ylabel("loss")
    ax.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    ax_t.plot(df["epoch"], df[EPOCH_TIME_COLUMN], color="C3")
    ax_t.set_ylabel("epoch time (s)")
    ax_lr.plot(df["epoch"], df["lr"], color="C4")
    ax_lr.set(ylabel="learning rate", xlabel="epoch")
    fig.tight_layout()
    _save(fig, out_png)
