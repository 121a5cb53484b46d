#!/usr/bin/env bash
# GPU benchmark: training it/s of kitsnet and nnU-Net (paper's 3d_fullres, 128^3, batch 2, same
# CPU worker count), GPU utilisation, model FLOP utilisation, sliding-window time of a full-size
# case; one table + benchmarks/results/gpu-<timestamp>.json.  See benchmarks/bench_gpu.py.
#
#   bash benchmarks/gpu.sh                 # one H100/H200: under 8 minutes
#   bash benchmarks/gpu.sh --smoke         # no GPU needed: tiny sizes on the CPU (CI), < 2 min
#   bash benchmarks/gpu.sh --help          # options (--workers, --seconds, --compile, ...)
#
# Without CUDA the smoke mode is chosen automatically.  The whole run is capped by `timeout`;
# the Python side has its own, tighter budget and per-part timeouts, and writes the JSON after
# every part, so a cut-off run still leaves the parts it finished.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi

if ! probe=$("$PY" -c 'import torch, kitsnet; print(int(torch.cuda.is_available()), torch.__version__)' 2>&1); then
  echo "gpu.sh: '$PY' cannot import torch and kitsnet (install the repository: pip install -e '.[peer]'):" >&2
  echo "$probe" >&2
  exit 2
fi
cuda=${probe%% *}
smoke=0
for a in "$@"; do [ "$a" = "--smoke" ] && smoke=1; done
if [ "$cuda" != "1" ] && [ "$smoke" = "0" ]; then
  echo "gpu.sh: CUDA is not available to torch ${probe#* }: running the CPU smoke mode" >&2
  set -- --smoke "$@"
  smoke=1
fi
if [ "$smoke" = "1" ]; then limit=${GPU_BENCH_LIMIT_S:-105}; else limit=${GPU_BENCH_LIMIT_S:-475}; fi

rc=0
timeout --signal=TERM --kill-after=15 "$limit" "$PY" -m benchmarks.bench_gpu "$@" || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "gpu.sh: stopped after ${limit} s; the JSON in the output folder has the finished parts" >&2
fi
exit "$rc"
