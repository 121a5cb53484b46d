import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# kitsnet is imported from this checkout so the workflow and the installed CLI never disagree.
sys.path.insert(0, workflow.basedir)
from kitsnet.dataset import list_cases, check_case_id  # noqa: E402
from kitsnet.plan import DATA_OF, PREVIOUS_STAGE  # noqa: E402

validate(config, "../config/schema.yaml")

CONFIGS = list(config["configurations"])
FOLDS = list(range(int(config["folds"])))
DATA_ROOT = config["data_root"]
SYNTHETIC = config.get("synthetic") or None
for _cfg in CONFIGS:
    _prev = PREVIOUS_STAGE.get(_cfg)
    if _prev and _prev not in CONFIGS:
        raise WorkflowError(f"configurations: {_cfg} needs {_prev} in 'configurations'")


def discover_cases():
    """Case ids: from the synthetic settings, or the folders of a real KiTS21 data root."""
    if SYNTHETIC:
        return [f"case_{i:05d}" for i in range(int(SYNTHETIC["cases"]))]
    if not os.path.isdir(DATA_ROOT):
        raise WorkflowError(f"data_root: {DATA_ROOT!r} is not a folder")
    found = list_cases(DATA_ROOT)
    if len(found) < len(FOLDS):
        raise WorkflowError(
            f"data_root: {DATA_ROOT!r} holds {len(found)} case_XXXXX folders, "
            f"fewer than folds={len(FOLDS)}"
        )
    return found


CASES = [check_case_id(c) for c in discover_cases()]
DATAS = sorted({DATA_OF[c] for c in CONFIGS})


wildcard_constraints:
    case=r"case_\d{5}",
    config="|".join(sorted(set(CONFIGS) | set(DATAS))),
    data="|".join(DATAS),
    fold=r"\d+",


def image_files(wildcards=None):
    return expand("{root}/{case}/imaging.nii.gz", root=DATA_ROOT, case=CASES)


def label_files(wildcards=None):
    return expand("{root}/{case}/aggregated_MAJ_seg.nii.gz", root=DATA_ROOT, case=CASES)


def data_root_of(image_files):
    """The data root, derived from the case files (case_XXXXX/imaging.nii.gz) it holds."""
    return str(Path(image_files[0]).parent.parent)


def preprocessed_files(data):
    return expand(
        "results/preprocessed/{data}/{case}{suffix}",
        data=data,
        case=CASES,
        suffix=["_image.npy", "_seg.npy", ".json"],
    )


def training_inputs(wildcards):
    """What a (configuration, fold) needs: its plan, the splits, the preprocessed cases and,
    for the cascade, the previous stage's out-of-fold segmentations from all its folds.
    """
    inputs = {
        "plan": f"results/plans/{wildcards.config}.json",
        "splits": "results/dataset/splits.json",
        "data": preprocessed_files(DATA_OF[wildcards.config]),
    }
    prev = PREVIOUS_STAGE.get(wildcards.config)
    if prev:
        inputs["prev"] = expand(
            "results/next_stage/{prev}/fold_{fold}", prev=prev, fold=FOLDS
        )
    return inputs


def job_resources(kind, key, default):
    return config.get("resources", {}).get(kind, {}).get(key, default)


def threads_for_training():
    return int(config["training"].get("threads", 1))


def prediction_inputs(wildcards):
    inputs = training_inputs(wildcards)
    inputs["model"] = (
        f"results/models/{wildcards.config}/fold_{wildcards.fold}/"
        + config["inference"]["checkpoint"]
    )
    return inputs
