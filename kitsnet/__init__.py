"""kitsnet: a small library that reproduces the coarse-to-fine 3D U-Net cascade on KiTS21.

One subpackage per workflow stage, as rules/X.smk runs kitsnet/X/: data, plan, preprocess,
train, predict, evaluate, report; below them core (I/O, device, resampling, settings, the step
environments' source), stages (the configuration graph) and model (network, checkpoint); cli on
top.  Imports point only down the data flow (tests/unit/test_architecture.py).
"""

import os as _os

__version__ = "0.1.0"

# In a workflow job run with --use-conda (KITSNET_WORKFLOW_SOURCE set by rules/common.smk): stop
# unless this kitsnet is the workflow's own source (kitsnet/core/source.py).
if _os.environ.get("KITSNET_WORKFLOW_SOURCE"):
    from kitsnet.core.source import check_environment as _check_environment

    _check_environment()
