"""Adapter: rule figures -> kitsnet.report.plot_reference / plot_predictions."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this checkout's kitsnet

from kitsnet.io import load_json, log_to
from kitsnet.report import plot_predictions, plot_reference

with log_to(snakemake.log[0]):
    p = snakemake.params
    splits = load_json(snakemake.input.splits)
    fold_of = {c: k for k, s in enumerate(splits) for c in s["val"]}
    cases = sorted(fold_of)[: int(p.n_cases)]
    images = {Path(f).parent.name: Path(f) for f in snakemake.input.images}
    refs = {Path(f).parent.name: Path(f) for f in snakemake.input.labels}
    plot_reference([(c, images[c], refs[c]) for c in cases], Path(snakemake.output.fig1))
    preds = {
        cfg: {c: Path(f"results/predictions/{cfg}/fold_{fold_of[c]}/{c}.nii.gz") for c in cases}
        for cfg in p.configs
    }
    plot_predictions(cases, images, refs, preds, Path(snakemake.output.fig2))
