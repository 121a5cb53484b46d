"""Adapter: rule postprocess -> kitsnet.postprocess.decide.postprocess_model (one model's
postprocessing decided and scored on its out-of-fold predictions)."""

import re
from pathlib import Path

import pandas as pd

from kitsnet.core.io import KitsnetError, load_json, log_to
from kitsnet.postprocess.decide import postprocess_model, write_decision, write_per_case


def fold_of(folder: Path, position: int) -> int:
    """The fold of ``.../fold_<k>``; the list position for a folder named otherwise."""
    match = re.fullmatch(r"fold_(\d+)", folder.name)
    return int(match.group(1)) if match else position


with log_to(snakemake.log[0]):
    splits = load_json(snakemake.input.splits)
    refs = {Path(f).parent.name: Path(f) for f in snakemake.input.labels}
    cases = {}
    for position, folder in enumerate(map(Path, snakemake.input.predictions)):
        fold = fold_of(folder, position)
        for case in splits[fold]["val"]:
            if case not in refs:
                raise KitsnetError(f"{case}: no reference among the workflow's label files")
            cases[case] = (fold, folder / f"{case}.nii.gz", refs[case])
    raw_scores = None
    if "scores" in snakemake.input.keys():
        raw_scores = pd.concat([pd.read_csv(f) for f in snakemake.input.scores], ignore_index=True)
    decision, per_case = postprocess_model(
        snakemake.params.model,
        list(snakemake.params.configurations),
        cases,
        raw_scores,
        jobs=int(snakemake.params.jobs),
    )
    names = snakemake.output.keys()
    write_decision(
        decision, snakemake.output.decision if "decision" in names else snakemake.output.json
    )
    write_per_case(per_case, snakemake.output.per_case)
    print(f"{decision['model']}: steps {decision['steps'] or 'none'}")
    for record in decision["candidates"]:
        print(record)
    print(decision["scores"])
