"""Adapter: rule fingerprint -> kitsnet.plan.fingerprint.fingerprint."""

from pathlib import Path

from kitsnet.core.io import log_to, save_json
from kitsnet.plan.fingerprint import fingerprint

with log_to(snakemake.log[0]):
    cases = [Path(f).parent.name for f in snakemake.input.images]
    fp = fingerprint(list(zip(cases, snakemake.input.images, snakemake.input.labels, strict=True)))
    save_json(fp, snakemake.output[0])
    print(fp["foreground_intensity"])
