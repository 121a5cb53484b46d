"""Adapter: rule figures -> kitsnet.report.figures.plot_reference / plot_predictions."""

from itertools import product
from pathlib import Path

from kitsnet.core.io import load_json, log_to
from kitsnet.report.figures import plot_predictions, plot_reference

with log_to(snakemake.log[0]):
    p = snakemake.params
    splits = load_json(snakemake.input.splits)
    fold_of = {c: k for k, s in enumerate(splits) for c in s["val"]}
    cases = sorted(fold_of)[: int(p.n_cases)]
    images = {Path(f).parent.name: Path(f) for f in snakemake.input.images}
    refs = {Path(f).parent.name: Path(f) for f in snakemake.input.labels}
    plot_reference([(c, images[c], refs[c]) for c in cases], Path(snakemake.output.fig1))
    # input.predictions is expand(config=configs, fold=folds), in that order
    folds = sorted(set(fold_of.values()))
    pred_dirs = dict(zip(product(p.configs, folds), snakemake.input.predictions, strict=True))
    preds = {
        cfg: {c: Path(pred_dirs[cfg, fold_of[c]]) / f"{c}.nii.gz" for c in cases}
        for cfg in p.configs
    }
    plot_predictions(cases, images, refs, preds, Path(snakemake.output.fig2))
