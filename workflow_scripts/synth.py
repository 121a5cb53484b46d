"""Adapter: rule synth -> kitsnet.synth.make_dataset."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this checkout's kitsnet

from kitsnet.io import log_to
from kitsnet.synth import make_dataset

with log_to(snakemake.log[0]):
    ids = make_dataset(snakemake.params.out, snakemake.params.cases, snakemake.params.seed)
    print(f"wrote {len(ids)} synthetic cases to {snakemake.params.out}")
