"""kitsnet: a small library that reproduces the coarse-to-fine 3D U-Net cascade on KiTS21.

Modules follow the pipeline's stages: io, dataset, synth, plan, preprocess, network, augment,
train, infer, cascade, evaluate, report, cli.
"""

__version__ = "0.1.0"
