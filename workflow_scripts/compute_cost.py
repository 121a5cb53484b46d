"""Adapter: rule compute_cost -> kitsnet.report.compute_cost / write_compute_cost."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this checkout's kitsnet

from kitsnet.io import log_to
from kitsnet.report import compute_cost, write_compute_cost

with log_to(snakemake.log[0]):
    p = snakemake.params
    files = {
        (c, f, step): Path(f"results/benchmarks/{step}/{c}_fold{f}.tsv")
        for step in ("train", "predict")
        for c in p.configs
        for f in p.folds
    }
    assert set(map(str, files.values())) == set(snakemake.input), "benchmark files out of sync"
    table = compute_cost(files, p.gpus)
    write_compute_cost(table, snakemake.output[0])
    print(table.to_string())
