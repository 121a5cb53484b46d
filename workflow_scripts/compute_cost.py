"""Adapter: rule compute_cost -> kitsnet.report.compute_cost.compute_cost / write_compute_cost."""

from itertools import product
from pathlib import Path

from kitsnet.core.io import log_to
from kitsnet.report.compute_cost import compute_cost, write_compute_cost

with log_to(snakemake.log[0]):
    p = snakemake.params
    # the rule's input is expand(step=[train, predict], config=configs, fold=folds), in order
    keys = [(c, f, step) for step, c, f in product(("train", "predict"), p.configs, p.folds)]
    assert len(keys) == len(snakemake.input), "benchmark files out of sync with the params"
    files = dict(zip(keys, map(Path, snakemake.input), strict=True))
    table = compute_cost(files, p.gpus)
    write_compute_cost(table, snakemake.output[0])
    print(table.to_string())
