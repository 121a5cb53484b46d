"""Adapter: rule preprocess -> kitsnet.preprocess.preprocess_case."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # this checkout's kitsnet

from kitsnet.io import load_json, log_to
from kitsnet.preprocess import preprocess_case

with log_to(snakemake.log[0]):
    o = snakemake.output
    preprocess_case(
        snakemake.input.image,
        snakemake.input.label,
        snakemake.wildcards.case,
        load_json(snakemake.input.plan),
        o.image,
        o.seg,
        o.props,
    )
