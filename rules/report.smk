rule table1:
    """Table 1: mean over all out-of-fold cases per configuration, beside the paper's values,
    with its statistics (fold SD, bootstrap interval, Wilcoxon tests against the cascade and,
    for a region-based row, against its base) and Figure 3 (per-case Dice)."""
    input:
        scores=expand(
            "results/scores/{config}/fold_{fold}.csv", config=CONFIGS, fold=FOLDS
        ),
        selection="results/model_selection.csv",
    output:
        csv=report(
            "results/table1.csv", caption="report/table1.rst", category="Table 1"
        ),
        md="results/table1.md",
        stats=report(
            "results/table1_stats.csv",
            caption="report/table1_stats.rst",
            category="Table 1",
        ),
        per_case=report(
            "results/scores_per_case.csv",
            caption="report/scores_per_case.rst",
            category="Table 1",
        ),
        fig3=report(
            "results/figures/fig3_per_case.png",
            caption="report/fig3.rst",
            category="Figures",
        ),
    log:
        "results/logs/table1/table1.log",
    conda:
        step_env("report")
    params:
        configs=CONFIGS,
        folds=FOLDS,
        # the bootstrap's seed: the workflow's, so a rerun gives the same intervals
        seed=config["seed"],
    script:
        "../workflow_scripts/table1.py"


rule figures:
    """Figure 1 (reference labels) and Figure 2 (each configuration's predictions)."""
    input:
        splits="results/dataset/splits.json",
        images=image_files(),
        labels=label_files(),
        predictions=expand(
            "results/predictions/{config}/fold_{fold}", config=CONFIGS, fold=FOLDS
        ),
    output:
        fig1=report(
            "results/figures/fig1_reference.png",
            caption="report/fig1.rst",
            category="Figures",
        ),
        fig2=report(
            "results/figures/fig2_predictions.png",
            caption="report/fig2.rst",
            category="Figures",
        ),
    log:
        "results/logs/figures/figures.log",
    conda:
        step_env("report")
    params:
        configs=CONFIGS,
        n_cases=config.get("report", {}).get("figure_cases", 3),
    script:
        "../workflow_scripts/figures.py"


rule compute_cost:
    """Wall time, peak memory and GPU-hours of every training and prediction job."""
    input:
        expand(
            "results/benchmarks/{step}/{config}_fold{fold}.tsv",
            step=["train", "predict"],
            config=CONFIGS,
            fold=FOLDS,
        ),
    output:
        report(
            "results/compute_cost.csv",
            caption="report/compute_cost.rst",
            category="Compute cost",
        ),
    log:
        "results/logs/compute_cost/compute_cost.log",
    conda:
        step_env("report")
    params:
        configs=CONFIGS,
        folds=FOLDS,
        gpus={
            (c, step): resource_value(step, "gpu", 1, c)
            for c in CONFIGS
            for step in ("train", "predict")
        },
    script:
        "../workflow_scripts/compute_cost.py"


rule training_curves:
    """All folds' loss and pseudo-Dice curves, one panel per configuration."""
    input:
        expand(
            "results/models/{config}/fold_{fold}/training_log.csv",
            config=CONFIGS,
            fold=FOLDS,
        ),
    output:
        report(
            "results/figures/training_curves.png",
            caption="report/training_curves.rst",
            category="Figures",
        ),
    log:
        "results/logs/training_curves/training_curves.log",
    conda:
        step_env("report")
    params:
        configs=CONFIGS,
        folds=FOLDS,
    script:
        "../workflow_scripts/training_curves.py"
