#!/usr/bin/env bash
# nnU-Net v2 peer for the cross-check tests (tests/test_*_nnunet.py): the 'peer' extra of
# pyproject.toml, installed into CI's active venv.  torch is named on the same command line so
# that the resolver keeps the CPU torch 2.13.0 (torchvision 0.28.0 is its matching release).
# Measured on a 2-core machine with a warm wheel cache: see the lead's report / README.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install -q "torch==2.13.0" -e ".[peer]"
python -c "import nnunetv2, torch; print('nnU-Net peer ready, torch', torch.__version__)"
