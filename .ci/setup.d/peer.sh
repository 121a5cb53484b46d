#!/usr/bin/env bash
# nnU-Net v2 peer for the cross-check tests (tests/nnunet/): the 'peer' extra of
# pyproject.toml, installed into CI's active venv.  torch is named on the same command line so
# that the resolver keeps the CPU torch 2.13.0 (torchvision 0.28.0 is its matching release).
# Cost on the 2-core dev machine: this script in a fresh venv 159 s with a cold pip cache
# (it also pulls kitsnet's own dependencies, so the later `pip install -e '.[test]'` took
# 16 s); nnunetv2 + torchvision on top of an installed '.[test]' venv 22 s (warm cache).
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install -q "torch==2.13.0" -e ".[peer]"
python -c "import nnunetv2, torch; print('nnU-Net peer ready, torch', torch.__version__)"
