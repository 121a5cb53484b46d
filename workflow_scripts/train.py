"""Adapter: rule train -> kitsnet.train.loop.train_fold (+ its progress plot)."""

from pathlib import Path

import torch

from kitsnet.core.io import load_json, log_to
from kitsnet.report.figures import plot_progress
from kitsnet.train.loop import train_fold

with log_to(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    plan = load_json(snakemake.input.plan)
    out = Path(snakemake.output.model).parent
    prev = list(snakemake.input.prev) if "prev" in snakemake.input.keys() else None
    train_fold(
        plan,
        load_json(snakemake.input.splits),
        int(snakemake.wildcards.fold),
        Path(snakemake.input.data[0]).parent,
        out,
        snakemake.params.training,
        snakemake.params.augmentation,
        prev_dirs=prev,
        seed=snakemake.params.seed,
        device=snakemake.params.training.get("device", "auto"),
    )
    plot_progress(Path(snakemake.output.log_csv), Path(snakemake.output.progress))
