"""Adapter: rule evaluate -> kitsnet.evaluate.folders (a fold's validation cases vs references)."""

from pathlib import Path

from kitsnet.core.io import KitsnetError, load_json, log_to
from kitsnet.evaluate.folders import evaluate_pairs, write_scores

with log_to(snakemake.log[0]):
    fold = int(snakemake.wildcards.fold)
    cases = load_json(snakemake.input.splits)[fold]["val"]
    pred_dir = Path(snakemake.input.predictions)
    missing = [c for c in cases if not (pred_dir / f"{c}.nii.gz").is_file()]
    if missing:
        raise KitsnetError(f"{pred_dir}: no prediction for validation case(s) {missing}")
    refs = {Path(f).parent.name: Path(f) for f in snakemake.input.labels}
    pairs = [(c, pred_dir / f"{c}.nii.gz", refs[c]) for c in cases]
    df = evaluate_pairs(pairs, jobs=int(snakemake.params.jobs))
    write_scores(df, snakemake.output[0])
    print(df.to_string())
