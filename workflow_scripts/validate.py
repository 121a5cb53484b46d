"""Adapter: rule validate_dataset -> kitsnet.dataset.validate_dataset."""



from kitsnet.dataset import validate_dataset
from kitsnet.io import log_to, save_json

with log_to(snakemake.log[0]):
    p = snakemake.params
    verdict = validate_dataset(p.root, list(p.cases), folds=int(p.folds), dataset=p.dataset)
    save_json(verdict, snakemake.output[0])
    print(f"{verdict['n_cases']} cases valid")
