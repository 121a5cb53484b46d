#!/usr/bin/env bash
# The GPU rows of `python -m benchmarks` (benchmarks/bench_gpu.py): seconds per training iteration
# and peak GPU memory of kitsnet's train_fold vs nnU-Net's train_step (the paper's 3d_fullres plan,
# 128^3, batch 2, the same CPU workers), and a 512^3 sliding window; one table and
# benchmarks/results/<UTC time>.json.
#
#   bash benchmarks/gpu.sh             # one H100/H200: under 8 minutes; without CUDA: skipped
#   bash benchmarks/gpu.sh --quick     # tiny sizes (on the CPU without CUDA: CI), < 2.5 min
#   bash benchmarks/gpu.sh --help      # the harness's options (--out, --timeout, ...)
#   KITSNET_GPU_BENCH='{"workers": 4, "compile": true}' bash benchmarks/gpu.sh   # settings
#
# The whole run is capped by `timeout`; on its SIGTERM the harness ends the running child and its
# workers and reports; the JSON is rewritten after every row, so a cut-off run keeps the others.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
if ! probe=$("$PY" -c 'import torch, kitsnet' 2>&1); then
  echo "gpu.sh: '$PY' cannot import torch and kitsnet (install the repository: pip install -e '.[peer]'):" >&2
  echo "$probe" >&2
  exit 2
fi
quick=0
for a in "$@"; do [ "$a" = "--quick" ] && quick=1; done
if [ "$quick" = "1" ]; then limit=${GPU_BENCH_LIMIT_S:-150}; else limit=${GPU_BENCH_LIMIT_S:-475}; fi

rc=0
timeout --signal=TERM --kill-after=15 "$limit" \
  "$PY" -m benchmarks --only gpu_train,gpu_window --timeout 300 "$@" || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "gpu.sh: stopped after ${limit} s; the JSON in the output folder has the finished rows" >&2
fi
exit "$rc"
