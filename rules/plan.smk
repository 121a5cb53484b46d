rule fingerprint:
    """Spacings, shapes and foreground intensity statistics of the validated dataset."""
    input:
        validated="results/dataset/validated.json",
        images=image_files(),
        labels=label_files(),
    output:
        "results/dataset/fingerprint.json",
    log:
        "results/logs/fingerprint/fingerprint.log",
    benchmark:
        "results/benchmarks/fingerprint/fingerprint.tsv"
    conda:
        step_env("torch")
    resources:
        mem_mb=step_resource("fingerprint", "mem_mb", 4000),
        runtime=step_resource("fingerprint", "runtime", 60),
    script:
        "../workflow_scripts/fingerprint.py"


rule plan:
    """One plan per configuration: spacing, patch, batch, network, normalisation."""
    input:
        "results/dataset/fingerprint.json",
    output:
        "results/plans/{config}.json",
    log:
        "results/logs/plan/{config}.log",
    conda:
        step_env("torch")
    params:
        cfg=lambda w: {"plan": config["plan"]},
    script:
        "../workflow_scripts/plan.py"


rule splits:
    """Cross-validation folds over sorted case ids (an existing splits file is honoured)."""
    input:
        "results/dataset/validated.json",
    output:
        "results/dataset/splits.json",
    log:
        "results/logs/splits/splits.log",
    conda:
        step_env("torch")
    params:
        cases=CASES,
        folds=len(FOLDS),
        seed=int(config["seed"]),
        splits_file=config.get("splits_file"),
    script:
        "../workflow_scripts/splits.py"
