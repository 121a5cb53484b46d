#!/usr/bin/env bash
# Installs a local SLURM (Debian's slurm-wlm, munge) for tests/workflow/test_slurm.py, which starts and
# stops the single-node cluster itself (tests/workflow/slurm/start_slurm.sh).  Without root or apt the
# SLURM tests skip with a reason.
set -euo pipefail
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "slurm.sh: not root or no apt-get; the SLURM tests will skip"
  exit 0
fi
if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
  echo "slurm.sh: slurm-wlm and munge already installed"
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
echo "slurm.sh: installed $(slurmctld -V)"
