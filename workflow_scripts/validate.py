"""Adapter: rule validate_dataset -> kitsnet.data.dataset.validate_dataset."""

from kitsnet.core.io import log_to, save_json
from kitsnet.data.dataset import validate_dataset

with log_to(snakemake.log[0]):
    p = snakemake.params
    verdict = validate_dataset(p.root, list(p.cases), folds=int(p.folds), dataset=p.dataset)
    save_json(verdict, snakemake.output[0])
    print(f"{verdict['n_cases']} cases valid")
