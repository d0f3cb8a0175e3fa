#!/usr/bin/env bash
# A real SLURM cluster on this machine, for tests and CI: munged, slurmctld and N slurmd ("nodes" n1..nN,
# all on 127.0.0.1), started in the background as root without systemd, stopped by the PIDs recorded here.
#
#   scripts/slurm_local.sh start [--nodes N]   install slurm/munge if missing, start what is not running
#   scripts/slurm_local.sh stop                cancel this cluster's jobs, stop the daemons started here
#   scripts/slurm_local.sh status              exit 0 when every daemon runs and all nodes answer
#   eval "$(scripts/slurm_local.sh env)"       point sbatch/squeue/scancel at this cluster (SLURM_CONF)
#
# Everything lives under $MAE_SLURM_DIR (default /tmp/mae-slurm); ports start at $MAE_SLURM_PORT (16817).
# Each daemon runs in the foreground under a background shell job, so the PID recorded is the daemon's.
set -euo pipefail

DIR=${MAE_SLURM_DIR:-/tmp/mae-slurm}
PORT=${MAE_SLURM_PORT:-16817}
CONF=$DIR/slurm.conf
PIDS=$DIR/pids
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "slurm_local: $*" >&2; exit 1; }
log() { echo "slurm_local: $*" >&2; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null && return 0
    [[ $(id -u) == 0 ]] || die "slurm/munge are not installed and installing them needs root: apt-get install ${PACKAGES[*]}"
    log "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$DIR/log/apt.log" 2>&1 || {
        apt-get update -q >>"$DIR/log/apt.log" 2>&1
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$DIR/log/apt.log" 2>&1 ||
            die "apt-get install failed, see $DIR/log/apt.log"
    }
}

# alive NAME: the daemon recorded as NAME runs (its PID exists and its command line names this cluster).
alive() {
    local pid
    pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
    [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/"
}

node_names() { sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF" 2>/dev/null; }

write_conf() {
    local nodes=$1 hw i
    # The node's hardware exactly as slurmd detects it, so it registers without being drained.
    hw=$(slurmd -C | head -n1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
    cat >"$CONF.new" <<EOF
ClusterName=mae-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5: a requeued job may start again after ~6 s instead of ~120 s.
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MailProg=/bin/true
KillWait=30
MinJobAge=600
EOF
    for ((i = 1; i <= nodes; i++)); do
        echo "NodeName=n$i NodeAddr=127.0.0.1 NodeHostname=$(hostname -s) Port=$((PORT + i)) $hw" >>"$CONF.new"
    done
    echo "PartitionName=debug Nodes=n[1-$nodes] Default=YES MaxTime=INFINITE State=UP" >>"$CONF.new"
    mv "$CONF.new" "$CONF"
}

# spawn NAME CMD...: run a foreground daemon in the background and record its PID.
spawn() {
    local name=$1
    shift
    alive "$name" && return 0
    setsid "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
}

wait_until() {
    local what=$1 seconds=$2
    shift 2
    for ((t = 0; t < seconds * 4; t++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    die "$what did not come up within ${seconds}s (logs: $DIR/log)"
}

nodes_idle() {
    local states
    states=$(SLURM_CONF=$CONF sinfo -h -N -o %T) || return 1
    [[ -n $states ]] && ! grep -qvE '^(idle|mixed|allocated)$' <<<"$states"
}

start() {
    local nodes=2
    while [[ $# -gt 0 ]]; do
        case $1 in
        --nodes) nodes=$2 && shift 2 ;;
        *) die "unknown option: $1" ;;
        esac
    done
    [[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
    [[ $(id -u) == 0 ]] || die "the local cluster runs its daemons as root; run as root"
    mkdir -p "$DIR"/{log,pids,run,state,spool,munge}
    chmod 711 "$DIR" "$DIR/munge"
    install_packages
    if [[ ! -f $CONF ]] || [[ $(node_names | wc -l) != "$nodes" ]]; then
        status >/dev/null 2>&1 && die "a cluster with $(node_names | wc -l) node(s) runs; stop it first"
        write_conf "$nodes"
    fi

    [[ -f $DIR/munge/munge.key ]] || {
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 600 "$DIR/munge/munge.key"
    }
    spawn munged munged --foreground --force --socket="$DIR/munge/munge.socket.2" \
        --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_until munged 10 test -S "$DIR/munge/munge.socket.2"

    spawn slurmctld slurmctld -D -f "$CONF"
    wait_until slurmctld 20 env SLURM_CONF="$CONF" scontrol ping
    for node in $(node_names); do
        mkdir -p "$DIR/spool/$node"
        spawn "slurmd-$node" slurmd -D -f "$CONF" -N "$node"
    done
    wait_until "the nodes" 30 nodes_idle
    for name in munged slurmctld $(node_names | sed 's/^/slurmd-/'); do
        alive "$name" || die "$name exited during start (logs: $DIR/log)"
    done
    log "up: $(node_names | wc -l) node(s); export SLURM_CONF=$CONF"
}

stop() {
    [[ -d $PIDS ]] || return 0
    if alive slurmctld; then
        local jobs
        jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs || true
            for ((t = 0; t < 160; t++)); do
                [[ -z $(SLURM_CONF=$CONF squeue -h -o %i -t running,completing 2>/dev/null) ]] && break
                sleep 0.25
            done
        fi
    fi
    local name pid
    for name in $(node_names | sed 's/^/slurmd-/') slurmctld munged; do
        if alive "$name"; then
            pid=$(cat "$PIDS/$name.pid")
            kill -TERM "$pid"
            for ((t = 0; t < 40; t++)); do
                alive "$name" || break
                sleep 0.25
            done
            alive "$name" && kill -KILL "$pid"
            log "stopped $name ($pid)"
        fi
        rm -f "$PIDS/$name.pid"
    done
}

status() {
    [[ -f $CONF ]] || { echo "not configured ($CONF missing)"; return 1; }
    local name ok=0
    for name in munged slurmctld $(node_names | sed 's/^/slurmd-/'); do
        if alive "$name"; then echo "$name: running ($(cat "$PIDS/$name.pid"))"; else echo "$name: stopped" && ok=1; fi
    done
    [[ $ok == 0 ]] && nodes_idle || return 1
    SLURM_CONF=$CONF sinfo -N
}

case ${1:-} in
start) shift && start "$@" ;;
stop) stop ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*) die "usage: $0 start [--nodes N] | stop | status | env" ;;
esac
