"""Adapter: rule plan -> kitsnet.plan.planner.make_plan."""

from kitsnet.core.io import load_json, log_to, save_json
from kitsnet.plan.planner import make_plan

with log_to(snakemake.log[0]):
    plan = make_plan(
        snakemake.wildcards.config, load_json(snakemake.input[0]), snakemake.params.cfg
    )
    save_json(plan, snakemake.output[0])
    print(plan)
