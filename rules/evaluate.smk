rule evaluate:
    """KiTS21 Dice and Surface Dice of one fold's validation predictions."""
    input:
        predictions="results/predictions/{config}/fold_{fold}",
        splits="results/dataset/splits.json",
        labels=label_files(),
    output:
        "results/scores/{config}/fold_{fold}.csv",
    params:
        root=DATA_ROOT,
        jobs=config.get("evaluation", {}).get("jobs", 1),
    log:
        "results/logs/evaluate/{config}_fold{fold}.log",
    benchmark:
        "results/benchmarks/evaluate/{config}_fold{fold}.tsv"
    threads: config.get("evaluation", {}).get("jobs", 1)
    conda:
        "../envs/kitsnet.yaml"
    script:
        "../workflow_scripts/evaluate.py"
