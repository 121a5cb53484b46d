"""Adapter: rule training_curves -> kitsnet.report.figures.plot_training_curves."""

from itertools import product
from pathlib import Path

from kitsnet.core.io import log_to
from kitsnet.report.figures import plot_training_curves

with log_to(snakemake.log[0]):
    p = snakemake.params
    # the rule's input is expand(config=configs, fold=folds), in that order
    keys = list(product(p.configs, p.folds))
    assert len(keys) == len(snakemake.input), "training logs out of sync with the params"
    logs = dict(zip(keys, map(Path, snakemake.input), strict=True))
    plot_training_curves(logs, Path(snakemake.output[0]))
