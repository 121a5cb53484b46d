"""Adapter: rule table1 -> kitsnet.report.collate / write_table."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this checkout's kitsnet

from kitsnet.io import log_to
from kitsnet.report import collate, write_table

with log_to(snakemake.log[0]):
    p = snakemake.params
    files = {(c, f): Path(f"results/scores/{c}/fold_{f}.csv") for c in p.configs for f in p.folds}
    assert set(map(str, files.values())) == set(snakemake.input), "score files out of sync"
    table, per_case = collate(files)
    o = snakemake.output
    write_table(table, per_case, o.csv, o.md, o.per_case)
    print(table.to_string())
