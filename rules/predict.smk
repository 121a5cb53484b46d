rule predict_lowres:
    """3d_lowres fold k predicts its validation cases, and writes their segmentations on the
    fullres grid: the cascade's out-of-fold previous-stage input."""
    input:
        unpack(prediction_inputs),
        fullres=preprocessed_files("3d_fullres"),
    output:
        predictions=directory("results/predictions/{config}/fold_{fold}"),
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
    """Predict one fold's validation cases with that fold's model, on the original grid."""
    input:
        unpack(prediction_inputs),
    output:
        predictions=directory("results/predictions/{config}/fold_{fold}"),
    log:
        "results/logs/predict/{config}_fold{fold}.log",
    benchmark:
        "results/benchmarks/predict/{config}_fold{fold}.tsv"
    wildcard_constraints:
        config="2d|3d_fullres|3d_cascade_fullres|3d_cascade_roi",
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
