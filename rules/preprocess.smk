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
        step_env("torch")
    resources:
        mem_mb=step_resource("preprocess", "mem_mb", 4000),
        runtime=step_resource("preprocess", "runtime", 30),
    script:
        "../workflow_scripts/preprocess.py"


rule crop_roi:
    """Crop one case's fullres arrays and its previous-stage segmentation to the region of
    interest the previous stage found (kitsnet.preprocess.roi): a ROI configuration's cases, one item
    per box."""
    input:
        unpack(crop_roi_inputs),
    output:
        intermediate(directory("results/preprocessed/{config}/{case}")),
    log:
        "results/logs/crop_roi/{config}_{case}.log",
    benchmark:
        "results/benchmarks/crop_roi/{config}_{case}.tsv"
    wildcard_constraints:
        config="|".join(ROI_CONFIGURATIONS),
    conda:
        step_env("torch")
    resources:
        mem_mb=step_resource("preprocess", "mem_mb", 4000),
        runtime=step_resource("preprocess", "runtime", 30),
    script:
        "../workflow_scripts/crop_roi.py"
