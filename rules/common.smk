import copy
import math
import os
import re
import sys
import tomllib
from pathlib import Path

import yaml
from snakemake.settings.types import DeploymentMethod
from snakemake.sourcecache import LocalSourceFile
from snakemake.utils import min_version

min_version("9.0")


def workflow_checkout():
    """The folder of this workflow's source when it is a local folder (a checkout, or an export
    of a tag), else None (a module read from Git through Snakemake's source cache)."""
    basedir = workflow.current_basedir  # rules/
    if isinstance(basedir, LocalSourceFile):
        return Path(basedir.get_path_or_uri(secret_free=True)).parent
    return None


def check_kitsnet_version():
    """kitsnet is the installed package (pip install -e '.[workflow]' in a checkout; beside a
    module deployment, the package of the release the module names), never this folder on
    sys.path.  It must be the release this workflow belongs to, or plans and arrays written
    by one version would be read by another.  Returns pyproject.toml's [project] table and the
    folder of the kitsnet source the step environments get: the workflow's own kitsnet/ (a
    checkout, local edits included), or, where the workflow is read from Git and has no
    folder, the installed package just checked."""
    with open(workflow.source_path("../pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    wanted = project["version"]
    install = (
        "pip install -e '.[workflow]' in a checkout of the workflow (for a module deployment, "
        f"a checkout of its release, tag v{wanted})"
    )
    try:
        import kitsnet
    except ImportError as err:
        raise WorkflowError(f"kitsnet is not installed ({err}): {install}")
    installed = Path(kitsnet.__file__).resolve().parent
    if kitsnet.__version__ != wanted:
        raise WorkflowError(
            f"this workflow is kitsnet {wanted}, but the installed kitsnet is "
            f"{kitsnet.__version__} ({installed}).  Install the matching release: {install}"
        )
    checkout = workflow_checkout()
    if checkout and (checkout / "kitsnet" / "__init__.py").is_file():
        return project, (checkout / "kitsnet").resolve()
    return project, installed


# Step environments (--use-conda): envs/*.yaml pin the third-party packages; kitsnet comes from
# the workflow's own source that runs here (kitsnet/core/source.py explains the mechanism).  Why not
# the environment files as they are: Snakemake 9.27 names an environment by a hash of its file
# and of envs/<name>.post-deploy.sh (deployment/conda.py, Env._get_hash), never of the code a
# post-deploy script would install, so a static script installing kitsnet would leave an
# environment holding old kitsnet code after an edit.  So, at parse time, a copy of each file
# and a post-deploy script naming a wheel of the source and its fingerprint are written under
# the working directory's .snakemake/kitsnet/<fingerprint>/: new code, new hash, new
# environment; and a job checks that its kitsnet is that source (KITSNET_WORKFLOW_SOURCE).
# A rule's conda: is step_env("<name>"), an absolute path computed at parse time (Snakemake
# reads it as a local file, also in a module deployment; a relative path would point into the
# workflow's source).  A callable conda: would work too (rules.py, expand_conda_env) but is
# called per job; the files are the same for every job.
KITSNET_PROJECT, KITSNET_SOURCE = check_kitsnet_version()
from kitsnet.core.source import ENV_VAR as SOURCE_ENV_VAR
from kitsnet.core.source import fingerprint as source_fingerprint
from kitsnet.core.source import read_package, write_step_environment, write_wheel

_KITSNET_FILES = read_package(KITSNET_SOURCE)
KITSNET_FINGERPRINT = source_fingerprint(_KITSNET_FILES)
STEP_ENV_DIR = Path(".snakemake", "kitsnet", KITSNET_FINGERPRINT[:16]).absolute()
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    # for the jobs' `import kitsnet` (kitsnet.core.source.check_environment); cluster jobs parse the
    # workflow again, so they set it too
    os.environ[SOURCE_ENV_VAR] = KITSNET_FINGERPRINT
_STEP_ENVS = {}


def step_env(name):
    """The conda: of a rule: envs/<name>.yaml, with this workflow's kitsnet (see above)."""
    if name not in _STEP_ENVS:
        with open(workflow.source_path(f"../envs/{name}.yaml")) as fh:
            pins = fh.read()
        if not _STEP_ENVS:
            _STEP_ENVS[None] = write_wheel(
                STEP_ENV_DIR, _KITSNET_FILES, KITSNET_PROJECT
            )
        _STEP_ENVS[name] = str(
            write_step_environment(
                STEP_ENV_DIR,
                name,
                pins,
                _STEP_ENVS[None],
                KITSNET_FINGERPRINT,
                origin=str(KITSNET_SOURCE),
            )
        )
    return _STEP_ENVS[name]


from kitsnet.data.dataset import list_cases, check_case_id, check_layout, label_name_of
from kitsnet.stages import CONFIGURATIONS, DATA_OF, PREVIOUS_STAGE, base_configuration
from kitsnet.core.settings import ConfigError, assemble_settings, check_settings
from kitsnet.core.settings import choose_preset, fit_resources, missing_data_root
from kitsnet.core.settings import resolve_data_root, setting_origin, shown_path

# The settings (kitsnet/core/settings.py): a preset's files from this workflow's config/ (beside the
# Snakefile, so --directory works), then the user's --configfile and --config on top.  The preset
# is a key, so an extra --configfile cannot switch the paper's run back to the demo.
PRESETS = {
    "demo": ["config/config.yaml"],
    "paper": ["config/config.yaml", "config/kits21.yaml"],
}
CONFIG_SCHEMA = "config/schema.yaml"
# The folder snakemake was started in, handed to the jobs that re-read this file (SLURM jobs,
# which start in the working directory) so that they resolve a relative data_root as it was.
LAUNCH_DIR_VARIABLE = "KITSNET_LAUNCH_DIR"


def checked(function, *args):
    """``function(*args)`` of kitsnet.core.settings, its ConfigError raised as Snakemake's
    WorkflowError: the message's few lines, without kitsnet's part of the traceback."""
    try:
        return function(*args)
    except ConfigError as err:
        raise WorkflowError(str(err)) from None


def find_launch_dir() -> str | None:
    """The folder the user started snakemake in, against which a relative data_root is read.

    With ``--directory DIR`` Snakemake changes into DIR before it reads this file, so the
    current folder is not where the user is (README: outputs on scratch, data beside the
    checkout).  Snakemake's API keeps the folder it left (its WorkdirHandler's ``olddir``) and
    nothing else does: found on the call stack, else the shell's $PWD.  A job that Snakemake
    spawned reads the folder its main process found.  None: unknown.
    """
    if workflow.remote_exec or workflow.subprocess_exec:
        if os.environ.get(LAUNCH_DIR_VARIABLE):
            return os.environ[LAUNCH_DIR_VARIABLE]
    if workflow.overwrite_workdir is None:
        return os.getcwd()
    frame = sys._getframe()
    while frame is not None:
        handler = getattr(frame.f_locals.get("self"), "_workdir_handler", None)
        if getattr(handler, "olddir", None):
            return str(handler.olddir)
        frame = frame.f_back
    pwd = os.environ.get("PWD")
    return pwd if pwd and os.path.isdir(pwd) else None


LAUNCH_DIR = find_launch_dir()
if LAUNCH_DIR:
    os.environ[LAUNCH_DIR_VARIABLE] = LAUNCH_DIR


def user_config_sources() -> list[tuple[str, dict]]:
    """(label, settings) of each source of the user's settings, lowest precedence first: the
    config files (--configfile, or a module deployment's configfile:), then --config (from the
    command line or a profile).  Snakemake merged them into `config` before this file runs, but
    an error message should name the one that set the faulty key."""
    sources = []
    given = {os.path.abspath(p) for p in workflow.config_settings.configfiles}
    for path in workflow.configfiles:
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError):
            continue
        flag = "--configfile" if os.path.abspath(path) in given else "configfile"
        sources.append((f"{flag} {shown_path(path, LAUNCH_DIR)}", data))
    if workflow.config_settings.config:
        sources.append(("--config", dict(workflow.config_settings.config)))
    return sources


def preset_files(preset: str) -> list[tuple[str, dict]]:
    """(name, settings) of each file of ``preset``, in the order they are layered."""
    files = []
    for name in PRESETS[preset]:
        with open(workflow.source_path(f"../{name}")) as fh:
            files.append((name, yaml.safe_load(fh) or {}))
    return files


def assemble_config(user: dict) -> dict:
    """The run's settings: the preset's files, then the user's (kitsnet.core.settings)."""
    preset = choose_preset(user, PRESETS)
    return assemble_settings(preset, [s for _, s in preset_files(preset)], user)


def origin_of(keys: list) -> str:
    """Which source set config key path ``keys``: the user's last that does, else the preset's."""
    preset = config["preset"]
    return setting_origin(keys, USER_SOURCES, preset, preset_files(preset))


USER_SOURCES = user_config_sources()
_assembled = checked(assemble_config, copy.deepcopy(config))
config.clear()
config.update(_assembled)
if not workflow.modifier.skip_validation:
    with open(workflow.source_path(f"../{CONFIG_SCHEMA}")) as _fh:
        _schema = yaml.safe_load(_fh)
    checked(check_settings, config, _schema, origin_of, CONFIG_SCHEMA)
# per-job requests within the run's --resources
_limits = {n: r.value for n, r in dict(workflow.global_resources).items()}
checked(fit_resources, config, _limits)

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


def missing_data_root_error(root: str) -> WorkflowError:
    """The error for a data_root that is not a folder (kitsnet.core.settings.missing_data_root)."""
    text = missing_data_root(root, config, DATASET, FETCH, LAUNCH_DIR, origin_of)
    return WorkflowError(text)


# A real data root is an absolute path from here on; synthetic data stays under results/.
LABEL_ROOT = (
    config["data_root"]
    if SYNTHETIC
    else checked(resolve_data_root, config["data_root"], LAUNCH_DIR, origin_of)
)
DATA_ROOT = f"results/data/{DATASET}" if FETCH else LABEL_ROOT
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
            raise missing_data_root_error(LABEL_ROOT)
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
        raise missing_data_root_error(DATA_ROOT)
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


# Model selection (rules/postprocess.smk): every configuration and every two-configuration
# ensemble ("A+B", in the order of config configurations), each scored with and without
# postprocessing on the out-of-fold cases.
PAIRS = [f"{a}+{b}" for i, a in enumerate(CONFIGS) for b in CONFIGS[i + 1 :]]
MODELS = CONFIGS + PAIRS


def _alternatives(names):
    """A wildcard constraint that matches exactly one of ``names`` ('+' taken literally)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


wildcard_constraints:
    case=r"case_\d{5}",
    config="|".join(sorted(set(CONFIGS) | set(DATAS))),
    data="|".join(DATAS),
    fold=r"\d+",
    pair=_alternatives(PAIRS),
    model=_alternatives(MODELS),


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
    from config ``resources``: ``resources.<step>.<name>.<key>`` (a region-based configuration
    without an entry: its base's), else ``resources.<step>.<key>``, else ``default``.  mem_mb and runtime (minutes) grow by ``resources.retry_factor`` per
    attempt, up to ``max_mem_mb`` / ``max_runtime``, so a job that SLURM killed for memory or time
    gets more on its retry (and training resumes from its checkpoint).
    """
    spec = RESOURCES.get(step) or {}
    own = spec.get(name) or spec.get(base_configuration(name or "")) or {}
    base = own.get(key, spec.get(key, default))
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


# The ROI configurations (kitsnet.preprocess.roi): the fullres cases cropped to the region the previous
# stage found, one folder per case (one item per box) written by rule crop_roi.
from kitsnet.stages import ROI_CONFIGURATIONS


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


def pair_members(pair):
    """The two configurations of an ensemble wildcard "A+B"."""
    return pair.split("+")


def ensemble_inputs(wildcards):
    """An ensemble of two configurations reads both members' out-of-fold probabilities (all
    folds) and the first member's segmentations, whose NIfTI headers it copies."""
    first, second = pair_members(wildcards.pair)
    return {
        "splits": "results/dataset/splits.json",
        "probabilities": expand(
            "results/probabilities/{config}/fold_{fold}",
            config=[first, second],
            fold=FOLDS,
        ),
        "geometry": expand(
            "results/predictions/{config}/fold_{fold}", config=first, fold=FOLDS
        ),
    }


def postprocess_inputs(wildcards):
    """Postprocessing of one model is decided on all its out-of-fold predictions against the
    references; a single configuration's raw scores are the evaluate jobs' (an ensemble is
    scored by the postprocess job itself)."""
    inputs = {
        "predictions": expand(
            "results/predictions/{model}/fold_{fold}", model=wildcards.model, fold=FOLDS
        ),
        "splits": "results/dataset/splits.json",
        "labels": label_files(),
    }
    if wildcards.model in CONFIGS:
        inputs["scores"] = expand(
            "results/scores/{config}/fold_{fold}.csv",
            config=wildcards.model,
            fold=FOLDS,
        )
    return inputs
