"""Adapter: rule table1 -> kitsnet.report.collate / write_table."""

from itertools import product
from pathlib import Path

from kitsnet.io import log_to
from kitsnet.report import collate, write_table

with log_to(snakemake.log[0]):
    p = snakemake.params
    # the rule's input is expand(config=configs, fold=folds), in that order
    keys = list(product(p.configs, p.folds))
    assert len(keys) == len(snakemake.input), "score files out of sync with the params"
    files = dict(zip(keys, map(Path, snakemake.input), strict=True))
    table, per_case = collate(files)
    o = snakemake.output
    write_table(table, per_case, o.csv, o.md, o.per_case)
    print(table.to_string())
