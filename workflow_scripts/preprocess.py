"""Adapter: rule preprocess -> kitsnet.preprocess.case.preprocess_case."""

from kitsnet.core.io import load_json, log_to
from kitsnet.preprocess.case import preprocess_case

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
