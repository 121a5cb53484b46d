rule predict_lowres:
    """3d_lowres fold k predicts its validation cases, and writes their segmentations on the
    fullres grid: the cascade's out-of-fold previous-stage input."""
    input:
        unpack(prediction_inputs),
        fullres=preprocessed_files("3d_fullres"),
    output:
        predictions=directory("results/predictions/{config}/fold_{fold}"),
        probabilities=directory("results/probabilities/{config}/fold_{fold}"),
        next_stage=intermediate(directory("results/next_stage/{config}/fold_{fold}")),
    log:
        "results/logs/predict/{config}_fold{fold}.log",
    benchmark:
        "results/benchmarks/predict/{config}_fold{fold}.tsv"
    wildcard_constraints:
        config="3d_lowres",
    conda:
        step_env("torch")
    threads: threads_for_training()
    resources:
        **gpu_job_resources("predict"),
        mem_mb=step_resource("predict", "mem_mb", 8000),
        runtime=step_resource("predict", "runtime", 30),
    params:
        inference=config["inference"],
        device=config["training"].get("device", "auto"),
    script:
        "../workflow_scripts/predict.py"


rule predict:
    """Predict one fold's validation cases with that fold's model, on the original grid, and
    their class probabilities in compact form (for the ensembles of model selection)."""
    input:
        unpack(prediction_inputs),
    output:
        predictions=directory("results/predictions/{config}/fold_{fold}"),
        probabilities=directory("results/probabilities/{config}/fold_{fold}"),
    log:
        "results/logs/predict/{config}_fold{fold}.log",
    benchmark:
        "results/benchmarks/predict/{config}_fold{fold}.tsv"
    wildcard_constraints:
        config=_alternatives(c for c in CONFIGURATIONS if c != "3d_lowres"),
    conda:
        step_env("torch")
    threads: threads_for_training()
    resources:
        **gpu_job_resources("predict"),
        mem_mb=step_resource("predict", "mem_mb", 8000),
        runtime=step_resource("predict", "runtime", 30),
    params:
        inference=config["inference"],
        device=config["training"].get("device", "auto"),
    script:
        "../workflow_scripts/predict.py"


rule ensemble:
    """Two configurations' out-of-fold probabilities averaged (nnU-Net's ensembling) and
    arg-maxed: the segmentations of the ensemble "A+B", every fold in one job."""
    input:
        unpack(ensemble_inputs),
    output:
        predictions=[
            directory(p)
            for p in expand("results/predictions/{{pair}}/fold_{fold}", fold=FOLDS)
        ],
    log:
        "results/logs/ensemble/{pair}.log",
    benchmark:
        "results/benchmarks/ensemble/{pair}.tsv"
    conda:
        step_env("evaluate")
    resources:
        mem_mb=step_resource("ensemble", "mem_mb", 4000),
        runtime=step_resource("ensemble", "runtime", 60),
    params:
        members=lambda wildcards: pair_members(wildcards.pair),
        folds=FOLDS,
    script:
        "../workflow_scripts/ensemble.py"
