"""Adapter: rule synth -> kitsnet.synth.make_dataset."""



from kitsnet.io import log_to
from kitsnet.synth import make_dataset

with log_to(snakemake.log[0]):
    ids = make_dataset(snakemake.params.out, snakemake.params.cases, snakemake.params.seed)
    print(f"wrote {len(ids)} synthetic cases to {snakemake.params.out}")
