"""kitsnet: a small library that reproduces the coarse-to-fine 3D U-Net cascade on KiTS21.

Modules follow the pipeline's stages: io, dataset, synth, fetch, settings, source, plan,
preprocess, network, augment, train, infer, roi, evaluate, report, cli.
"""

import os as _os

__version__ = "0.1.0"

# In a workflow job run with --use-conda (KITSNET_WORKFLOW_SOURCE set by rules/common.smk): stop
# unless this kitsnet is the workflow's own source (kitsnet/source.py).
if _os.environ.get("KITSNET_WORKFLOW_SOURCE"):
    from kitsnet.source import check_environment as _check_environment

    _check_environment()
