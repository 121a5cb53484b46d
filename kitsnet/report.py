"""Table 1 and Figures 1-2 of the paper, plus training curves, from the pipeline's outputs.

Everything here reads files that earlier stages wrote (per-fold score CSVs, training logs,
NIfTI volumes) from explicit paths handed in by the workflow, and writes outputs atomically with
fixed formatting, so a rerun on the same inputs produces byte-identical CSVs and (with the same
matplotlib) identical PNGs.  Arrays are in nibabel order ``(slices, rows, cols)``: an axial slice
is ``array[k]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from kitsnet.io import KitsnetError, atomic_path, load_volume  # noqa: E402

__all__ = [
    "CONFIG_ORDER",
    "METRIC_COLUMNS",
    "PAPER_TABLE1",
    "collate",
    "write_table",
    "plot_reference",
    "plot_predictions",
    "plot_training_curves",
    "plot_progress",
]

CONFIG_ORDER = ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]  # the paper's row order
METRIC_COLUMNS = ["dice_kidney", "dice_masses", "dice_tumor", "sd_kidney", "sd_masses", "sd_tumor"]
LOG_COLUMNS = ["epoch", "train_loss", "val_loss", "pseudo_dice", "ema_pseudo_dice", "lr"]

_NAN = float("nan")
# Table 1 of Y. George, "A Coarse-to-Fine 3D U-Net Network for Semantic Segmentation of Kidney CT
# Scans", Kidney and Kidney Tumor Segmentation (KiTS 2021), LNCS 13168, pp. 137-142, Springer 2022,
# doi:10.1007/978-3-030-98385-7_18: "Average 5-fold performance measures for the trained U-Net
# models", transcribed from the paper's text (../shared/paper/, Table 1; the abstract repeats the
# cascade's Dice).  The paper's "Cyst" column is KiTS21's hierarchical "masses" region (tumour +
# cyst): its values lie between kidney and tumour, as only masses can.  SD = Surface Dice.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    config: dict(zip(METRIC_COLUMNS, values, strict=True))
    for config, values in {
        "2d": [0.9615, 0.7686, 0.7367, 0.9072, 0.6154, 0.5787],
        "3d_fullres": [0.9691, 0.8693, 0.8535, 0.9359, 0.7626, 0.7415],
        "3d_lowres": [0.9685, 0.8705, 0.8568, 0.9272, 0.7508, 0.7377],
        "3d_cascade_fullres": [0.9748, 0.8813, 0.8710, 0.9448, 0.7728, 0.7605],
    }.items()
}

# Not the paper: the KiTS21 organisers' nnU-Net baseline, 5-fold CV on the 300 training cases
# (github.com/neheller/kits21, examples/nnUNet_baseline/README.md, commit 0377e842).  Shown in the
# markdown for context: the same recipe, run by the challenge organisers.
NNUNET_BASELINE: dict[str, dict[str, float]] = {
    config: dict(zip(METRIC_COLUMNS, values, strict=True))
    for config, values in {
        "3d_fullres": [0.9666, 0.8618, 0.8493, 0.9336, 0.7532, 0.7371],
        "3d_lowres": [0.9683, 0.8702, 0.8508, 0.9272, 0.7507, 0.7347],
        "3d_cascade_fullres": [0.9747, 0.8799, 0.8491, 0.9453, 0.7714, 0.7393],
    }.items()
}

# Figure 1 colours of the paper: kidney blue, tumour orange, cyst green (label -> RGB).
LABEL_COLOURS = {1: (0.12, 0.47, 0.90), 2: (1.0, 0.55, 0.0), 3: (0.15, 0.75, 0.25)}
LABEL_NAMES = {1: "kidney", 2: "tumor", 3: "cyst"}
HU_WINDOW = (-200.0, 300.0)
_PNG_META = {"Software": None}  # no version string, so reruns compare equal


def _read_csv(path: Path, required: Sequence[str], what: str) -> pd.DataFrame:
    """Read a CSV and check its columns, so a bad input fails here with its name, not in a plot."""
    path = Path(path)
    if not path.is_file():
        raise KitsnetError(f"{path}: {what} file is missing")
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise KitsnetError(f"{path}: unreadable {what} file ({exc})") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise KitsnetError(f"{path}: {what} file lacks column(s) {missing}")
    return df


def _config_rank(config: str, path: Path) -> int:
    if config not in CONFIG_ORDER:
        raise KitsnetError(f"{path}: unknown configuration {config!r} (expected {CONFIG_ORDER})")
    return CONFIG_ORDER.index(config)


def collate(score_files: dict[tuple[str, int], Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pool the out-of-fold per-case scores of each configuration into Table 1.

    The value is the mean over all cases (each scored once, by the fold that held it out), not
    the mean of fold means, which is how nnU-Net and the paper summarise a cross-validation.
    NaN scores (a region absent from both reference and prediction) are skipped in the mean.
    """
    frames = []
    for (config, fold), path in sorted(score_files.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        _config_rank(config, path)
        df = _read_csv(path, ["case", *METRIC_COLUMNS], "score")
        frames.append(df[["case", *METRIC_COLUMNS]].assign(model=config, fold=int(fold)))
    if not frames:
        raise KitsnetError("collate: no score files given")
    wide = pd.concat(frames, ignore_index=True)
    dup = wide[wide.duplicated(["model", "case"], keep=False)]
    if not dup.empty:
        model, case = dup.iloc[0][["model", "case"]]
        raise KitsnetError(f"{model}: case {case} is scored in more than one fold")

    long = wide.melt(
        id_vars=["model", "fold", "case"], value_vars=METRIC_COLUMNS, var_name="metric"
    )
    long["_m"] = long["model"].map(CONFIG_ORDER.index)
    long["_k"] = long["metric"].map(METRIC_COLUMNS.index)
    long = long.sort_values(["_m", "fold", "case", "_k"]).drop(columns=["_m", "_k"])
    per_case = long[["model", "fold", "case", "metric", "value"]].reset_index(drop=True)

    means = wide.groupby("model")[METRIC_COLUMNS].mean()
    present = [c for c in CONFIG_ORDER if c in means.index]
    table = means.loc[present].reset_index()[["model", *METRIC_COLUMNS]]
    return table, per_case


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.4f}"


def _markdown(table: pd.DataFrame, per_case: pd.DataFrame) -> str:
    """One row per (model, metric) so every number sits beside the paper's and the difference."""
    lines = [
        "# Table 1: 5-fold cross-validation, mean over out-of-fold cases",
        "",
        "| Model | Metric | Ours | Paper | Ours - Paper | nnU-Net baseline | Cases |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in table.itertuples(index=False):
        cases = per_case.loc[per_case["model"] == row.model, "case"].nunique()
        for metric in METRIC_COLUMNS:
            ours = float(getattr(row, metric))
            paper = PAPER_TABLE1.get(row.model, {}).get(metric, _NAN)
            base = NNUNET_BASELINE.get(row.model, {}).get(metric, _NAN)
            lines.append(
                f"| {row.model} | {metric} | {_fmt(ours)} | {_fmt(paper)} | "
                f"{_fmt(ours - paper)} | {_fmt(base)} | {cases} |"
            )
    lines += [
        "",
        "Notes: `masses` = tumor + cyst (the paper's 'Cyst' column); `sd_*` = KiTS21 surface Dice.",
        "Paper values: Table 1 of the paper, KiTS 2021 proceedings (LNCS 13168),",
        "doi:10.1007/978-3-030-98385-7_18 (5-fold cross-validation means on the 300 cases).",
        "nnU-Net baseline: KiTS21 organisers' 5-fold CV (neheller/kits21), context only.",
        "",
    ]
    return "\n".join(lines)


def write_table(
    table: pd.DataFrame, per_case: pd.DataFrame, out_csv: Path, out_md: Path, out_per_case: Path
) -> None:
    """Write Table 1 (CSV + markdown) and the long per-case scores with fixed float formatting."""
    for df, out in ((table, out_csv), (per_case, out_per_case)):
        with atomic_path(out) as tmp:
            df.to_csv(tmp, index=False, float_format="%.6f", lineterminator="\n")
    with atomic_path(out_md) as tmp:
        tmp.write_text(_markdown(table, per_case))


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
    handles = [Patch(color=LABEL_COLOURS[v], label=LABEL_NAMES[v]) for v in LABEL_COLOURS]
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
    configs = [c for c in CONFIG_ORDER if c in pred_paths]
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


def plot_training_curves(logs: dict[tuple[str, int], Path], out_png: Path) -> None:
    """One panel per configuration: losses (left axis) and EMA pseudo-Dice (right) per fold."""
    by_config: dict[str, list[tuple[int, pd.DataFrame]]] = {}
    for (config, fold), path in sorted(logs.items()):
        _config_rank(config, path)
        by_config.setdefault(config, []).append((fold, _read_csv(path, LOG_COLUMNS, "log")))
    configs = [c for c in CONFIG_ORDER if c in by_config]
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
    df = _read_csv(Path(log_csv), [*LOG_COLUMNS, "epoch_time_s"], "log")
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
    ax_t.plot(df["epoch"], df["epoch_time_s"], color="C3")
    ax_t.set_ylabel("epoch time (s)")
    ax_lr.plot(df["epoch"], df["lr"], color="C4")
    ax_lr.set(ylabel="learning rate", xlabel="epoch")
    fig.tight_layout()
    _save(fig, out_png)


# ----------------------------------------------------------------------------- compute cost
COST_COLUMNS = ["configuration", "fold", "step", "wall_s", "max_rss_mb", "gpus", "gpu_hours"]
__all__ += ["COST_COLUMNS", "compute_cost", "write_compute_cost"]


def compute_cost(
    benchmarks: Mapping[tuple[str, int, str], Path], gpus: Mapping[tuple[str, str], int]
) -> pd.DataFrame:
    """The compute-cost table: one row per (configuration, fold, step) from Snakemake's
    ``benchmark:`` TSVs, given as ``{(configuration, fold, step): path}``.

    ``wall_s`` is the job's wall time (mean over benchmark repeats), ``max_rss_mb`` its peak
    resident memory (Snakemake's ``max_rss``, MB; empty when the job was too short to sample),
    ``gpus`` the GPUs the job asked for (``gpus[(configuration, step)]``, 0 when absent) and
    ``gpu_hours`` = wall time x GPUs / 3600: what a cluster accounts, whether or not the job used
    the GPU.  A job that was retried is represented by its last attempt.
    """
    rows = []
    for (config, fold, step), path in benchmarks.items():
        path = Path(path)
        rank = _config_rank(config, path)
        df = _read_benchmark(path)
        wall = float(df["s"].mean())
        rss = pd.to_numeric(df["max_rss"], errors="coerce").max()
        n_gpu = int(gpus.get((config, step), 0))
        rows.append(
            {
                "configuration": config,
                "fold": int(fold),
                "step": step,
                "wall_s": wall,
                "max_rss_mb": float(rss),
                "gpus": n_gpu,
                "gpu_hours": wall * n_gpu / 3600.0,
                "_rank": (rank, int(fold), step != "train", step),
            }
        )
    if not rows:
        raise KitsnetError("compute_cost: no benchmark files given")
    table = pd.DataFrame(rows).sort_values("_rank", kind="stable").drop(columns="_rank")
    return table[COST_COLUMNS].reset_index(drop=True)


def _read_benchmark(path: Path) -> pd.DataFrame:
    """A Snakemake benchmark TSV with at least its wall time ``s`` and ``max_rss`` columns."""
    if not path.is_file():
        raise KitsnetError(f"{path}: benchmark file is missing")
    try:
        df = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise KitsnetError(f"{path}: unreadable benchmark file ({exc})") from exc
    missing = [c for c in ("s", "max_rss") if c not in df.columns]
    if missing or df.empty:
        raise KitsnetError(f"{path}: benchmark file lacks column(s) {missing or 'rows'}")
    return df


def write_compute_cost(table: pd.DataFrame, out_csv: Path) -> None:
    """Write the compute-cost table with fixed formatting (seconds and MB to 0.01, GPU-h 1e-4)."""
    out = table.copy()
    out["wall_s"] = out["wall_s"].map(lambda v: f"{v:.2f}")
    out["max_rss_mb"] = out["max_rss_mb"].map(lambda v: "" if math.isnan(v) else f"{v:.2f}")
    out["gpu_hours"] = out["gpu_hours"].map(lambda v: f"{v:.4f}")
    with atomic_path(out_csv) as tmp:
        out.to_csv(tmp, index=False, lineterminator="\n")
