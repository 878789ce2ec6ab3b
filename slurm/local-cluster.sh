#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, for kdlab's Slurm tests and for trying sweeps.
#
#   slurm/local-cluster.sh start    # install (Debian: slurm-wlm, slurmdbd, munge, mariadb), configure, start
#   slurm/local-cluster.sh stop     # stop the daemons this script started
#   slurm/local-cluster.sh status   # sinfo, or exit 1 when the cluster is not up
#
# Both start and stop are idempotent: start only installs what is missing and only starts daemons
# that are not running, so calling it before every test run costs a second. slurmdbd (on MariaDB)
# is part of it because without accounting `sacct` fails and submitit cannot tell a finished job
# from a failed one. Exit code 3 means "cannot run here" (not root, or no apt-get to install
# with): callers skip the Slurm tests on that code and fail on any other.
#
# It writes /etc/slurm/{slurm,slurmdbd}.conf, marked as kdlab's; it refuses to replace files
# without that mark, so it never clobbers a real cluster's configuration.
set -euo pipefail

MARK="# written by kdlab slurm/local-cluster.sh"
CLUSTER=kdlab
DB_PASS=kdlab-local
HOST=$(hostname -s)
CPUS=$(nproc)
LOGS=/var/log/slurm
STATE=/var/lib/slurm

log() { echo "[local-cluster] $*"; }
unavailable() { echo "[local-cluster] cannot start a local Slurm: $*" >&2; exit 3; }

pid_file() { [[ $1 == mariadb ]] && echo /run/mysqld/kdlab-mariadb.pid || echo "/run/kdlab-$1.pid"; }

running() { # running NAME: its pid file names a live process
  local pid_file
  pid_file=$(pid_file "$1")
  [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v munged >/dev/null || missing+=(munge)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  ((${#missing[@]} == 0)) && return
  [[ $(id -u) == 0 ]] || unavailable "${missing[*]} missing and not root (run as root, or install them)"
  command -v apt-get >/dev/null || unavailable "${missing[*]} missing and no apt-get (install them by hand)"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
}

write_config() { # write_config PATH MODE: stdin to PATH, unless PATH is someone else's config
  local path=$1 mode=$2 content
  content="$MARK"$'\n'"$(cat)"
  if [[ -f $path ]] && ! grep -qF "$MARK" "$path"; then
    unavailable "$path exists and is not kdlab's (a real cluster?); not replacing it"
  fi
  if [[ ! -f $path || $(cat "$path") != "$content" ]]; then
    printf '%s\n' "$content" >"$path"
  fi
  chmod "$mode" "$path"
}

configure() {
  mkdir -p /etc/slurm "$LOGS" "$STATE/slurmctld" "$STATE/slurmd"
  write_config /etc/slurm/slurmdbd.conf 600 <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
PidFile=/run/kdlab-slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
EOF
  # linuxproc/none: no cgroups needed (containers, CI). CR_Core: each job holds the cores it asks
  # for, so two one-CPU jobs run side by side on a two-core machine. KillWait 5 s: a requeued or
  # cancelled job's processes go quickly.
  write_config /etc/slurm/slurm.conf 644 <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=/run/kdlab-slurmctld.pid
SlurmdPidFile=/run/kdlab-slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$HOST CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if echo | munge 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  log "starting munged"
  runuser -u munge -- munged
  for _ in $(seq 50); do echo | munge 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  unavailable "munged does not answer"
}

start_mariadb() {
  if mariadb-admin ping >/dev/null 2>&1; then return; fi
  log "starting mariadb"
  install -d -o mysql -g mysql /run/mysqld
  [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null
  (setsid mariadbd --user=mysql --pid-file=/run/mysqld/kdlab-mariadb.pid >"$LOGS/mariadb.log" 2>&1 &)
  for _ in $(seq 100); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.2; done
  mariadb-admin ping >/dev/null 2>&1 || { tail -5 "$LOGS/mariadb.log" >&2; exit 1; }
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurm() {
  if ! running slurmdbd; then
    log "starting slurmdbd"
    slurmdbd
    for _ in $(seq 100); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
  running slurmctld || { log "starting slurmctld"; slurmctld; }
  running slurmd || { log "starting slurmd"; slurmd; }
  local state=""
  for _ in $(seq 150); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    case $state in
      idle | mixed | allocated | completing) log "up: node $HOST ($CPUS CPUs) is $state"; return ;;
      down* | drain* | drained*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  echo "[local-cluster] node $HOST did not come up (state '$state'); see $LOGS/" >&2
  exit 1
}

stop() {
  local name pid_file
  for name in slurmd slurmctld slurmdbd mariadb; do
    pid_file=$(pid_file "$name")
    if running "$name"; then
      log "stopping $name"
      kill "$(cat "$pid_file")"
      for _ in $(seq 100); do running "$name" || break; sleep 0.1; done
    fi
  done
}

case ${1:-} in
  start)
    install_packages
    [[ $(id -u) == 0 ]] || unavailable "the daemons run as root here (SlurmUser=root); run as root"
    configure
    start_munge
    start_mariadb
    start_slurm
    ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
