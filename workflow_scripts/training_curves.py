"""Adapter: rule training_curves -> kitsnet.figures.plot_training_curves."""

from pathlib import Path

from kitsnet.figures import plot_training_curves
from kitsnet.io import log_to

with log_to(snakemake.log[0]):
    p = snakemake.params
    logs = {
        (c, f): Path(f"results/models/{c}/fold_{f}/training_log.csv")
        for c in p.configs
        for f in p.folds
    }
    plot_training_curves(logs, Path(snakemake.output[0]))
