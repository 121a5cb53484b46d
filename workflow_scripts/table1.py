"""Adapter: rule table1 -> kitsnet.report.table1.collate / write_table,
kitsnet.report.stats.table1_stats, kitsnet.report.figures.plot_per_case,
kitsnet.report.selection.selection_markdown (the model-selection section of table1.md)."""

from itertools import product
from pathlib import Path

from kitsnet.core.io import log_to
from kitsnet.report.figures import plot_per_case
from kitsnet.report.selection import selection_markdown
from kitsnet.report.stats import StatsSettings, table1_stats
from kitsnet.report.table1 import collate, paper_values, write_table

with log_to(snakemake.log[0]):
    p = snakemake.params
    # the rule's scores are expand(config=configs, fold=folds), in that order
    keys = list(product(p.configs, p.folds))
    scores = list(snakemake.input.scores)
    assert len(keys) == len(scores), "score files out of sync with the params"
    files = dict(zip(keys, map(Path, scores), strict=True))
    table, per_case = collate(files)
    paper = paper_values(table["model"])
    settings = StatsSettings(seed=int(p.seed))
    stats = table1_stats(per_case, paper, settings)
    o = snakemake.output
    outputs = {k: Path(getattr(o, k)) for k in ("csv", "md", "stats", "per_case")}
    appendix = selection_markdown(Path(snakemake.input.selection))
    write_table(table, per_case, stats, settings, outputs, appendix=appendix)
    plot_per_case(per_case, paper, Path(o.fig3))
    print(table.to_string())
    print(stats.to_string())
