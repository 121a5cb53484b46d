"""Adapter: rule splits -> kitsnet.plan.splits.make_splits (or an existing splits file)."""

from kitsnet.core.io import log_to, save_json
from kitsnet.plan.splits import load_or_make_splits

with log_to(snakemake.log[0]):
    p = snakemake.params
    splits = load_or_make_splits(list(p.cases), int(p.folds), int(p.seed), p.splits_file)
    save_json(splits, snakemake.output[0])
    for k, s in enumerate(splits):
        print(f"fold {k}: {len(s['train'])} train, {len(s['val'])} val")
