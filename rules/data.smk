if SYNTHETIC:

    rule synth:
        """Generate the synthetic KiTS-like demo dataset in KiTS21's layout."""
        output:
            images=image_files(),
            labels=label_files(),
        log:
            "results/logs/synth/synth.log",
        benchmark:
            "results/benchmarks/synth/synth.tsv"
        conda:
            "../envs/kitsnet.yaml"
        params:
            out=lambda w, output: data_root_of(output.images),
            cases=int(SYNTHETIC["cases"]),
            seed=int(SYNTHETIC["seed"]),
        script:
            "../workflow_scripts/synth.py"


rule validate_dataset:
    """Check every case up front and report all problems at once."""
    input:
        images=image_files(),
        labels=label_files(),
    output:
        "results/dataset/validated.json",
    log:
        "results/logs/validate_dataset/validate_dataset.log",
    conda:
        "../envs/kitsnet.yaml"
    params:
        root=lambda w, input: data_root_of(input.images),
        cases=CASES,
        folds=len(FOLDS),
    script:
        "../workflow_scripts/validate.py"
