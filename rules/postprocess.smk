rule postprocess:
    """Postprocessing of one model (a configuration or a two-configuration ensemble), decided
    on its out-of-fold predictions as nnU-Net decides it: each candidate (nnU-Net's largest
    components and the KiTS-aware ones) kept only where it raises the mean Dice; the decision
    and the scores with and without it."""
    input:
        unpack(postprocess_inputs),
    output:
        decision="results/postprocessing/{model}.json",
        per_case="results/postprocessing/{model}_per_case.csv",
    log:
        "results/logs/postprocess/{model}.log",
    benchmark:
        "results/benchmarks/postprocess/{model}.tsv"
    conda:
        step_env("evaluate")
    threads: config.get("evaluation", {}).get("jobs", 1)
    resources:
        mem_mb=step_resource("postprocess", "mem_mb", 4000),
        runtime=step_resource("postprocess", "runtime", 120),
    params:
        model=lambda wildcards: wildcards.model,
        configurations=lambda wildcards: wildcards.model.split("+"),
        jobs=config.get("evaluation", {}).get("jobs", 1),
    script:
        "../workflow_scripts/postprocess.py"


rule model_selection:
    """Every configuration and every two-configuration ensemble, with and without its
    postprocessing, ranked by the mean of the six KiTS21 scores; the best, with its
    postprocessing, is what `kitsnet predict` runs."""
    input:
        expand("results/postprocessing/{model}.json", model=MODELS),
    output:
        csv=report(
            "results/model_selection.csv",
            caption="report/model_selection.rst",
            category="Model selection",
        ),
        best="results/best_configuration.json",
    log:
        "results/logs/model_selection/model_selection.log",
    conda:
        step_env("report")
    params:
        models=MODELS,
        folds=FOLDS,
        # what kitsnet predict repeats to give the workflow's labels
        inference=config["inference"],
    script:
        "../workflow_scripts/model_selection.py"
