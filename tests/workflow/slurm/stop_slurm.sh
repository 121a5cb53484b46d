#!/usr/bin/env bash
# Stop what tests/workflow/slurm/start_slurm.sh started, by PID file only (munged only if it started it).
set -u
BASE=${SLURM_BASE:-/tmp/kitsnet-slurm}
stop_pidfile() {  # $1: pid file
  [ -s "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$1"
}
if [ -s "$BASE/run/slurmctld.pid" ] && command -v scancel >/dev/null; then
  scancel --user="$(id -un)" 2>/dev/null || true
fi
stop_pidfile "$BASE/run/slurmd.pid"
stop_pidfile "$BASE/run/slurmctld.pid"
if [ -s "$BASE/run/munged.started" ] && [ "$(cat "$BASE/run/munged.started")" = "$(cat /run/munge/munged.pid 2>/dev/null)" ]; then
  stop_pidfile /run/munge/munged.pid
fi
rm -f "$BASE/run/munged.started"
echo "slurm stopped"
