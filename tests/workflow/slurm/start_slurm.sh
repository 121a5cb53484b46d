#!/usr/bin/env bash
# Bring up a single-node SLURM (Debian's slurm-wlm, munge) on this machine for the workflow's
# SLURM tests: no systemd, no cgroups, no slurmdbd, and FAKE_GPUS fake GPUs (gres/gpu backed by
# /dev/null-like files) so that jobs asking --gpus=1 are scheduled.  Run as root.
#
#   env: SLURM_BASE=/tmp/kitsnet-slurm  PARTITION=debug  FAKE_GPUS=2  INSTALL=1
#
# Without slurmdbd, sacct cannot answer: snakemake must be run with
#   --slurm-status-command squeue          (MinJobAge below is long enough for that)
# tests/workflow/slurm/stop_slurm.sh stops what this script started (by PID file).
set -euo pipefail
BASE=${SLURM_BASE:-/tmp/kitsnet-slurm}
PARTITION=${PARTITION:-debug}
FAKE_GPUS=${FAKE_GPUS:-2}
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / 2 ))  # half the RAM
t0=$(date +%s)

if [ "$(id -u)" != 0 ]; then echo "start_slurm.sh: must run as root" >&2; exit 2; fi
if [ "${INSTALL:-1}" = 1 ] && ! command -v slurmctld >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
fi
for b in slurmctld slurmd sbatch squeue sinfo munged; do
  command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || { echo "start_slurm.sh: $b missing" >&2; exit 2; }
done
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts  # daemons resolve it

# A fresh state directory every time: stale DRAIN reasons and old jobs survive restarts otherwise.
rm -rf "$BASE/state" "$BASE/spool"
mkdir -p "$BASE"/{etc,state,spool,log,run,gpu}
gres_files=()
for i in $(seq 0 $((FAKE_GPUS - 1))); do
  : > "$BASE/gpu/nvidia$i"       # gres/gpu needs a File= per GPU; any existing file will do
  gres_files+=("NodeName=$HOST Name=gpu File=$BASE/gpu/nvidia$i")
done

cat > "$BASE/etc/slurm.conf" <<CONF
ClusterName=kitsnet-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd and no cgroups on CI machines
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
# finished jobs stay visible to 'squeue' this long (snakemake's squeue status mode needs >= 120 s)
MinJobAge=600
# a job without --mem would otherwise take the whole node's memory
DefMemPerCPU=1000
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
GresTypes=gpu
NodeName=$HOST CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
{ echo "AutoDetect=off"; printf '%s\n' "${gres_files[@]}"; } > "$BASE/etc/gres.conf"

# snakemake's slurm-jobstep plugin drops every SLURM_* variable (SLURM_CONF too) before its srun,
# so the configuration must be found at the compiled-in default /etc/slurm/.
mkdir -p /etc/slurm
ln -sf "$BASE/etc/slurm.conf" /etc/slurm/slurm.conf
ln -sf "$BASE/etc/gres.conf" /etc/slurm/gres.conf
export SLURM_CONF=/etc/slurm/slurm.conf

# munge: apt's postinst normally creates the key; without systemd munged is started by hand.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey -c -f -k /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
rm -f "$BASE/run/munged.started"
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  cp /run/munge/munged.pid "$BASE/run/munged.started" 2>/dev/null || true  # ours to stop later
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
sleep 0.5
if ! kill -0 "$(cat "$BASE/run/slurmctld.pid" 2>/dev/null || echo 0)" 2>/dev/null; then
  echo "slurmctld died:" >&2; tail -5 "$BASE/log/slurmctld.log" >&2; exit 1
fi

# wait until the node is idle; resume it once if it registers drained or down
state=""
for i in $(seq 120); do
  state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null || true)
  case "$state" in
    idle) break ;;
    drain*|down*|inval*) [ "$i" -gt 8 ] && { scontrol update nodename="$HOST" state=resume 2>/dev/null || true; } ;;
  esac
  sleep 0.25
done
if [ "$state" != idle ]; then
  echo "node not idle: '$state'" >&2; tail -20 "$BASE"/log/*.log >&2; exit 1
fi
sinfo -N -o '%N %P %T %c %m %G'
echo "slurm up in $(( $(date +%s) - t0 )) s (partition=$PARTITION node=$HOST cpus=$CPUS gres=gpu:$FAKE_GPUS fake)"
