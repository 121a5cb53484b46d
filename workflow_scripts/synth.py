"""Adapter: rule synth -> kitsnet.data.synth.make_dataset."""

from kitsnet.core.io import log_to
from kitsnet.data.synth import make_dataset

with log_to(snakemake.log[0]):
    ids = make_dataset(snakemake.params.out, snakemake.params.cases, snakemake.params.seed)
    print(f"wrote {len(ids)} synthetic cases to {snakemake.params.out}")
