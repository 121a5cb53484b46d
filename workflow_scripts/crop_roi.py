"""Adapter: rule crop_roi -> kitsnet.preprocess.roi.crop_case (one case cropped to its region
of interest)."""

from kitsnet.core.io import load_json, log_to
from kitsnet.preprocess.roi import crop_case
from kitsnet.stages import find_previous_stage

with log_to(snakemake.log[0]):
    case = snakemake.wildcards.case
    crop_case(
        case,
        snakemake.input.image,
        snakemake.input.seg,
        snakemake.input.props,
        # the one fold of the previous stage that had this case in its validation set
        find_previous_stage(case, list(snakemake.input.prev)),
        load_json(snakemake.input.plan),
        snakemake.output[0],
    )
