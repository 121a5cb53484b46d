"""Adapter: rule model_selection -> kitsnet.postprocess.selection.write_selection."""

from pathlib import Path

from kitsnet.core.io import log_to
from kitsnet.postprocess.selection import write_selection

with log_to(snakemake.log[0]):
    p = snakemake.params
    # the rule's input is expand(model=models), in that order
    assert len(p.models) == len(snakemake.input), "decision files out of sync with the params"
    decisions = dict(zip(p.models, map(Path, snakemake.input), strict=True))
    o = snakemake.output
    best = write_selection(decisions, p.folds, Path(o.csv), Path(o.best), p.inference)
    print(Path(o.csv).read_text())
    print(
        f"best: {best['model']} (postprocessed: {best['postprocessed']}), "
        f"kits_score {best['scores']['kits_score']:.4f}"
    )
