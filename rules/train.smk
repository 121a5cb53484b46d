rule train:
    """Train one configuration on one fold (resumes from its checkpoint when restarted)."""
    input:
        unpack(training_inputs),
    output:
        # the weeks of GPU time: write-protected, so no rerun or clean-up removes them unasked
        model=protected("results/models/{config}/fold_{fold}/model_final.pt"),
        best=protected("results/models/{config}/fold_{fold}/model_best.pt"),
        log_csv="results/models/{config}/fold_{fold}/training_log.csv",
        progress=report(
            "results/models/{config}/fold_{fold}/progress.png",
            caption="report/progress.rst",
            category="Training",
            subcategory="{config}",
            labels={"configuration": "{config}", "fold": "{fold}"},
        ),
    log:
        "results/logs/train/{config}_fold{fold}.log",
    benchmark:
        "results/benchmarks/train/{config}_fold{fold}.tsv"
    conda:
        step_env("torch")
    threads: threads_for_training()
    resources:
        **gpu_job_resources("train"),
        mem_mb=step_resource("train", "mem_mb", 8000),
        runtime=step_resource("train", "runtime", 60),
    params:
        training=config["training"],
        augmentation=config["augmentation"],
        seed=int(config["seed"]),
    script:
        "../workflow_scripts/train.py"
