import copy
import math
import os
import tomllib
from pathlib import Path

import yaml
from snakemake.utils import min_version, update_config, validate

min_version("9.0")


def check_kitsnet_version():
    """kitsnet is the installed package (pip install -e '.[workflow]' in a checkout; pinned to the
    workflow's release tag in envs/*.yaml and in a module deployment), never this folder on
    sys.path.  It must be the release this workflow belongs to, or plans and arrays written
    by one version would be read by another."""
    with open(workflow.source_path("../pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    wanted, repository = project["version"], project["urls"]["Repository"]
    install = (
        "pip install -e '.[workflow]' in a checkout of the workflow, or "
        f"pip install 'kitsnet[workflow] @ git+{repository}@v{wanted}'"
    )
    try:
        import kitsnet
    except ImportError as err:
        raise WorkflowError(f"kitsnet is not installed ({err}): {install}")
    if kitsnet.__version__ != wanted:
        raise WorkflowError(
            f"this workflow is kitsnet {wanted}, but the installed kitsnet is "
            f"{kitsnet.__version__} ({os.path.dirname(kitsnet.__file__)}).  Install the "
            f"matching release: {install}"
        )


check_kitsnet_version()
from kitsnet.dataset import list_cases, check_case_id, check_layout, label_name_of
from kitsnet.plan import DATA_OF, PREVIOUS_STAGE

# The settings: the files of a preset from this workflow's config/ folder (found beside the
# Snakefile, not in the working directory, so --directory works), then the user's --configfile
# and --config on top.  The preset is a key, so an extra --configfile cannot silently switch
# the paper's run (the profile's `config: preset=paper`) back to the demo.
PRESETS = {
    "demo": ["config/config.yaml"],
    "paper": ["config/config.yaml", "config/kits21.yaml"],
}


def assemble_config(user):
    preset = user.get("preset", "demo")
    if preset not in PRESETS:
        raise WorkflowError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    merged = {}
    for name in PRESETS[preset]:
        with open(workflow.source_path(f"../{name}")) as fh:
            update_config(merged, yaml.safe_load(fh))
    update_config(merged, user)
    merged["preset"] = preset
    return merged


_assembled = assemble_config(copy.deepcopy(config))
config.clear()
config.update(_assembled)
validate(config, "../config/schema.yaml")

CONFIGS = list(config["configurations"])
FOLDS = list(range(int(config["folds"])))
# which data: the synthetic demo, or real KiTS21 / KiTS23 cases (their label file names differ);
# without a dataset key, synthetic when synthetic: is set
DATASET = config.get("dataset") or (
    "synthetic" if config.get("synthetic") else "kits21"
)
SYNTHETIC = (config.get("synthetic") or None) if DATASET == "synthetic" else None
if DATASET == "synthetic" and not SYNTHETIC:
    raise WorkflowError(
        "dataset: synthetic needs the synthetic: settings (cases, seed)"
    )
LABEL_NAME = label_name_of(DATASET)
# fetch_imaging: the labels stay in the user's data_root (a clone of the organisers'
# repository); the imaging is downloaded and the labels copied to results/data/<dataset>, which
# the rest of the workflow reads.  Nothing is written into data_root.
FETCH = bool(config.get("fetch_imaging")) and DATASET != "synthetic"
LABEL_ROOT = config["data_root"]
DATA_ROOT = f"results/data/{DATASET}" if FETCH else config["data_root"]
for _cfg in CONFIGS:
    _prev = PREVIOUS_STAGE.get(_cfg)
    if _prev and _prev not in CONFIGS:
        raise WorkflowError(f"configurations: {_cfg} needs {_prev} in 'configurations'")


def discover_cases():
    """Case ids: from the synthetic settings, or the folders of a real KiTS data root (with
    fetch_imaging: the case folders of the labels' root that hold a label file)."""
    if SYNTHETIC:
        return [f"case_{i:05d}" for i in range(int(SYNTHETIC["cases"]))]
    if FETCH:
        if not os.path.isdir(LABEL_ROOT):
            raise WorkflowError(f"data_root: {LABEL_ROOT!r} is missing or not a folder")
        cases = [
            c
            for c in list_cases(LABEL_ROOT)
            if os.path.isfile(f"{LABEL_ROOT}/{c}/{LABEL_NAME}")
        ]
        if len(cases) < len(FOLDS):
            raise WorkflowError(
                f"data_root: {LABEL_ROOT!r} has {len(cases)} case folders with {LABEL_NAME} "
                f"({DATASET}), fewer than the {len(FOLDS)} folds"
            )
        return cases
    if not os.path.isdir(DATA_ROOT):
        raise WorkflowError(f"data_root: {DATA_ROOT!r} is missing or not a folder")
    # names and stat() only, so a broken layout stops the workflow before any job; the
    # validate_dataset rule reads every volume
    problems = check_layout(DATA_ROOT, folds=len(FOLDS), label_name=LABEL_NAME)
    if problems:
        raise WorkflowError(
            f"data_root: {DATA_ROOT!r} has {len(problems)} problem(s) (folds={len(FOLDS)}):\n"
            + "\n".join(problems)
            + f"\n(`kitsnet validate {DATA_ROOT}` also checks the content of every case; "
            + "missing imaging: `kitsnet fetch` or fetch_imaging: true)"
        )
    return list_cases(DATA_ROOT)


def check_synthetic_root():
    """Synthetic cases are generated only under results/: never into a folder the user owns."""
    root = os.path.normpath(DATA_ROOT)
    if SYNTHETIC and (os.path.isabs(root) or root.split(os.sep)[0] != "results"):
        raise WorkflowError(
            f"data_root: {DATA_ROOT!r} is outside results/, but synthetic: is set (preset "
            f"{config['preset']!r}), so the workflow would generate synthetic cases there.  "
            "Synthetic data is only generated under results/ (the demo's data_root: "
            "results/data/demo).  For real data use the paper's settings: preset: paper (in "
            "your config file, or --config preset=paper ...), or synthetic: null.  Note that "
            "a --configfile or --config on the command line replaces the one a profile sets."
        )


check_synthetic_root()
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
    return expand("{root}/{case}/{name}", root=DATA_ROOT, case=CASES, name=LABEL_NAME)


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
    for the cascade, the previous stage's out-of-fold segmentations from all its folds.  A ROI
    configuration reads its cropped cases instead, which hold their previous stage.
    """
    if int(wildcards.fold) not in FOLDS:
        raise WorkflowError(
            f"fold {wildcards.fold} is out of range: config 'folds' is {len(FOLDS)}, "
            f"so folds are 0..{len(FOLDS) - 1}"
        )
    inputs = {
        "plan": f"results/plans/{wildcards.config}.json",
        "splits": "results/dataset/splits.json",
        "data": preprocessed_files(DATA_OF[wildcards.config]),
    }
    if wildcards.config in ROI_CONFIGURATIONS:
        inputs["data"] = cropped_case_dirs(wildcards.config)
        return inputs
    prev = PREVIOUS_STAGE.get(wildcards.config)
    if prev:
        inputs["prev"] = expand(
            "results/next_stage/{prev}/fold_{fold}", prev=prev, fold=FOLDS
        )
    return inputs


RESOURCES = config.get("resources") or {}
RETRY_FACTOR = float(RESOURCES.get("retry_factor", 1.5))
RESOURCE_CAPS = {
    "mem_mb": RESOURCES.get("max_mem_mb"),
    "runtime": RESOURCES.get("max_runtime"),
}


def resource_value(step, key, default, name, attempt=1):
    """Resource ``key`` (gpu, mem_mb, runtime) of ``step`` for configuration (or grid) ``name``
    from config ``resources``: ``resources.<step>.<name>.<key>``, else ``resources.<step>.<key>``,
    else ``default``.  mem_mb and runtime (minutes) grow by ``resources.retry_factor`` per
    attempt, up to ``max_mem_mb`` / ``max_runtime``, so a job that SLURM killed for memory or time
    gets more on its retry (and training resumes from its checkpoint).
    """
    spec = RESOURCES.get(step) or {}
    base = (spec.get(name) or {}).get(key, spec.get(key, default))
    if key not in RESOURCE_CAPS:
        return base
    grown = math.ceil(base * RETRY_FACTOR ** (attempt - 1))
    cap = RESOURCE_CAPS[key]
    return int(max(base, min(grown, cap)) if cap else grown)


def step_resource(step, key, default):
    """The ``resources:`` callable of a rule: resource_value for the job's {config} or {data}."""

    def value(wildcards, attempt):
        name = wildcards.get("config") or wildcards.get("data")
        return resource_value(step, key, default, name, attempt)

    return value


def intermediate(path):
    """Outputs that only feed later steps (preprocessed arrays, the cascade's previous-stage
    segmentations): kept by default; with keep_intermediates: false Snakemake deletes each once
    its last consumer has run (a later run does not redo the work that used them)."""
    return path if config.get("keep_intermediates", True) else temp(path)


def gpu_job_resources(step):
    """The GPU request of a GPU rule (config resources.<step>.gpu, default 1) and, for SLURM, the
    partition and account of GPU jobs (resources.gpu_partition / gpu_account, else the
    environment's KITSNET_GPU_PARTITION / KITSNET_GPU_ACCOUNT); CPU jobs keep the profile's.
    """
    res = {"gpu": step_resource(step, "gpu", 1)}
    for key, var in (
        ("partition", "KITSNET_GPU_PARTITION"),
        ("account", "KITSNET_GPU_ACCOUNT"),
    ):
        value = RESOURCES.get(f"gpu_{key}") or os.environ.get(var)
        if value:
            res[f"slurm_{key}"] = value
    return res


def threads_for_training():
    return int(config["training"].get("threads", 1))


def prediction_inputs(wildcards):
    inputs = training_inputs(wildcards)
    inputs["model"] = (
        f"results/models/{wildcards.config}/fold_{wildcards.fold}/"
        + config["inference"]["checkpoint"]
    )
    return inputs


# The ROI configurations (kitsnet.roi): the fullres cases cropped to the region the previous
# stage found, one folder per case (one item per box) written by rule crop_roi.
from kitsnet.plan import ROI_CONFIGURATIONS


def cropped_case_dirs(config_name):
    return expand(
        "results/preprocessed/{config}/{case}", config=config_name, case=CASES
    )


def crop_roi_inputs(wildcards):
    """What cropping one case needs: the plan (its roi settings), the case's arrays on the
    grid it is cropped from, and the previous stage's out-of-fold segmentations of all folds
    (which fold predicted the case is only known from splits.json, when the job runs).
    """
    data = f"results/preprocessed/{DATA_OF[wildcards.config]}/{wildcards.case}"
    prev = PREVIOUS_STAGE[wildcards.config]
    return {
        "plan": f"results/plans/{wildcards.config}.json",
        "image": f"{data}_image.npy",
        "seg": f"{data}_seg.npy",
        "props": f"{data}.json",
        "prev": expand("results/next_stage/{prev}/fold_{fold}", prev=prev, fold=FOLDS),
    }
