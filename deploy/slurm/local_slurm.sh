#!/usr/bin/env bash
# A one-node Slurm on this machine (slurmctld + slurmd + munge on localhost) for the Slurm tests.
# Root only. Installs Debian's slurm-wlm and munge when they are absent, writes a config for this host
# (its CPUs and memory as `slurmd -C` reports them), starts the daemons and waits until the node is idle.
#   deploy/slurm/local_slurm.sh start   # idempotent: leaves a running cluster alone
#   deploy/slurm/local_slurm.sh stop    # stops only the daemons this script started (pid files)
set -euo pipefail
STATE=${DDSM_SLURM_STATE:-/var/lib/ddsm-slurm}
CONF=/etc/slurm/slurm.conf

die() { echo "local_slurm: $*" >&2; exit 2; }

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || die "slurm-wlm is not installed and installing it needs root"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
}

write_conf() {
  local node cpus mem
  node=$(hostname -s)
  cpus=$(nproc)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm
  chown -R slurm:slurm "$STATE/ctld" /var/log/slurm
  cat > "$CONF" <<CONF
# Written by deploy/slurm/local_slurm.sh: one node, localhost only, no cgroups (containers).
ClusterName=ddsm-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=${DDSM_SLURMCTLD_PORT:-6817}
SlurmdPort=${DDSM_SLURMD_PORT:-6818}
AuthType=auth/munge
SlurmUser=slurm
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install
  [ "$(id -u)" = 0 ] || die "starting slurmctld/slurmd needs root"
  mkdir -p "$STATE"
  [ -f "$CONF" ] && grep -q local_slurm.sh "$CONF" || write_conf
  mkdir -p /run/munge && chown munge:munge /run/munge
  if ! running "$STATE/munged.pid"; then
    [ -s /etc/munge/munge.key ] || (mungekey --create 2>/dev/null || create-munge-key -f)
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    sudo_munge="runuser -u munge --"
    $sudo_munge munged --pid-file="$STATE/munged.pid" 2>/dev/null || munged --force --pid-file="$STATE/munged.pid"
  fi
  running "$STATE/slurmctld.pid" || slurmctld
  running "$STATE/slurmd.pid" || slurmd
  for _ in $(seq 60); do
    state=$(sinfo -h -o %t 2>/dev/null | head -1 || true)
    case "$state" in idle|mix|alloc) echo "local_slurm: node $(hostname -s) is $state"; return 0;; esac
    [ "$state" = down ] || [ "$state" = "down*" ] && scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
    sleep 1
  done
  die "node did not become idle in 60 s (see /var/log/slurm/slurmctld.log, slurmd.log)"
}

stop() {
  for d in slurmd slurmctld munged; do
    if running "$STATE/$d.pid"; then kill "$(cat "$STATE/$d.pid")"; fi
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop" ;;
esac
