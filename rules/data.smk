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
            step_env("torch")
        params:
            out=lambda w, output: data_root_of(output.images),
            cases=int(SYNTHETIC["cases"]),
            seed=int(SYNTHETIC["seed"]),
        script:
            "../workflow_scripts/synth.py"


if FETCH:

    # downloads need the network, which login nodes have and compute nodes often lack
    localrules:
        fetch_imaging,

    rule fetch_imaging:
        """Download one case's CT from KiTS's host into results/data/<dataset>, beside a copy of
        its label file from data_root (kitsnet.data.fetch: resumable, verified)."""
        input:
            label=f"{LABEL_ROOT}/{{case}}/{LABEL_NAME}",
        output:
            image=f"{DATA_ROOT}/{{case}}/imaging.nii.gz",
            label=f"{DATA_ROOT}/{{case}}/{LABEL_NAME}",
        log:
            "results/logs/fetch_imaging/{case}.log",
        conda:
            step_env("torch")
        params:
            dataset=DATASET,
            base_url=config.get("fetch_base_url"),
        script:
            "../workflow_scripts/fetch.py"


rule validate_dataset:
    """Check every case up front and report all problems at once."""
    input:
        images=image_files(),
        labels=label_files(),
    output:
        "results/dataset/validated.json",
    log:
        "results/logs/validate_dataset/validate_dataset.log",
    benchmark:
        "results/benchmarks/validate_dataset/validate_dataset.tsv"
    conda:
        step_env("torch")
    resources:
        mem_mb=step_resource("fingerprint", "mem_mb", 4000),
        runtime=step_resource("fingerprint", "runtime", 60),
    params:
        root=lambda w, input: data_root_of(input.images),
        cases=CASES,
        folds=len(FOLDS),
        dataset="kits21" if DATASET == "synthetic" else DATASET,
    script:
        "../workflow_scripts/validate.py"
