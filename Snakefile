# Coarse-to-fine 3D U-Net on KiTS21: 2d, 3d_lowres, 3d_fullres and the cascade, 5-fold CV,
# collated into results/table1.csv and the paper's figures.  The demo default (synthetic data)
# runs on a laptop CPU:  snakemake --cores 2
# The paper's settings:   snakemake --cores N --config preset=paper data_root=DIR
# (the settings are assembled in rules/common.smk: the preset's files from config/, then the
# user's --configfile / --config on top)


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/plan.smk"
include: "rules/preprocess.smk"
include: "rules/train.smk"
include: "rules/predict.smk"
include: "rules/evaluate.smk"
include: "rules/postprocess.smk"
include: "rules/report.smk"


report: "rules/report/workflow.rst"


# Tiny bookkeeping jobs run where snakemake runs, not through a cluster executor's queue.
localrules:
    plan,
    splits,
    table1,
    training_curves,
    compute_cost,
    model_selection,


rule all:
    default_target: True
    input:
        "results/table1.csv",
        "results/table1.md",
        "results/table1_stats.csv",
        "results/scores_per_case.csv",
        "results/figures/fig1_reference.png",
        "results/figures/fig2_predictions.png",
        "results/figures/fig3_per_case.png",
        "results/figures/training_curves.png",
        "results/compute_cost.csv",
        "results/model_selection.csv",
        "results/best_configuration.json",
