rule evaluate:
    """KiTS21 Dice and Surface Dice of one fold's validation predictions."""
    input:
        predictions="results/predictions/{config}/fold_{fold}",
        splits="results/dataset/splits.json",
        labels=label_files(),
    output:
        "results/scores/{config}/fold_{fold}.csv",
    log:
        "results/logs/evaluate/{config}_fold{fold}.log",
    benchmark:
        "results/benchmarks/evaluate/{config}_fold{fold}.tsv"
    conda:
        step_env("evaluate")
    threads: config.get("evaluation", {}).get("jobs", 1)
    resources:
        mem_mb=step_resource("evaluate", "mem_mb", 4000),
        runtime=step_resource("evaluate", "runtime", 60),
    params:
        jobs=config.get("evaluation", {}).get("jobs", 1),
    script:
        "../workflow_scripts/evaluate.py"
