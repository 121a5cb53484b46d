rule preprocess:
    """Normalise and resample one case to a plan's grid (fullres or lowres)."""
    input:
        plan="results/plans/{data}.json",
        image=f"{DATA_ROOT}/{{case}}/imaging.nii.gz",
        label=f"{DATA_ROOT}/{{case}}/{LABEL_NAME}",
    output:
        image=intermediate("results/preprocessed/{data}/{case}_image.npy"),
        seg=intermediate("results/preprocessed/{data}/{case}_seg.npy"),
        props=intermediate("results/preprocessed/{data}/{case}.json"),
    log:
        "results/logs/preprocess/{data}_{case}.log",
    benchmark:
        "results/benchmarks/preprocess/{data}_{case}.tsv"
    conda:
        "../envs/torch.yaml"
    resources:
        mem_mb=step_resource("preprocess", "mem_mb", 4000),
        runtime=step_resource("preprocess", "runtime", 30),
    script:
        "../workflow_scripts/preprocess.py"
