"""Adapter: rules predict / predict_lowres -> kitsnet.predict.infer.predict_fold (the
segmentations, their compact probabilities and, for predict_lowres, the next stage)."""

from pathlib import Path

import torch

from kitsnet.core.io import load_json, log_to
from kitsnet.predict.infer import predict_fold

with log_to(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    fold = int(snakemake.wildcards.fold)
    cases = load_json(snakemake.input.splits)[fold]["val"]
    prev = list(snakemake.input.prev) if "prev" in snakemake.input.keys() else None
    next_stage = None
    if "next_stage" in snakemake.output.keys():
        next_stage = (Path(snakemake.input.fullres[0]).parent, snakemake.output.next_stage)
    predict_fold(
        snakemake.input.model,
        cases,
        Path(snakemake.input.data[0]).parent,
        snakemake.output.predictions,
        snakemake.params.inference,
        prev_dirs=prev,
        next_stage=next_stage,
        device=snakemake.params.device,
        prob_dir=snakemake.output.probabilities,
    )
