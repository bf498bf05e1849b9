#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine, for testing profiles/slurm for real.
#
#   tests/slurm/start-local-slurm.sh [STATE_DIR]      (default: $VLMOPT_SLURM_DIR or /tmp/vlmopt-slurm)
#   export SLURM_CONF=STATE_DIR/etc/slurm.conf         (or: source STATE_DIR/env.sh)
#   tests/slurm/stop-local-slurm.sh [STATE_DIR]
#
# Needs root. Installs Debian's slurm-wlm and munge with apt-get if they are missing, then writes
# everything (configuration, munge key, state, logs, pid files) under STATE_DIR, links
# /etc/slurm/slurm.conf to its slurm.conf (if no other configuration is there; the stop script
# removes the link) and starts munged (as the munge user), slurmctld and slurmd. The node has this
# machine's CPUs, fake typed GPUs "testgpu" (device files are symlinks to /dev/null) and two
# partitions, `cpu` (the default) and `gpu`, named like the placeholders of profiles/slurm. Running
# it again while the cluster is up changes nothing. Exit codes: 0 up, 2 not root, 3 installation
# failed, 4 a daemon did not start, 5 the node did not become idle in time, 6 another SLURM on this
# machine (its configuration at /etc/slurm/slurm.conf, or its ports).
#
# Settings (environment): VLMOPT_SLURM_GPUS fake GPUs on the node (default 2);
# VLMOPT_SLURM_MEM_MB memory the node claims (default 131072: the profile's GPU rules ask for
# 32 GB per attempt; nothing enforces it, as no cgroups are used); VLMOPT_SLURM_WAIT_S seconds to
# wait for the node (default 60); VLMOPT_SLURM_CTLD_PORT and VLMOPT_SLURM_SLURMD_PORT (6817, 6818).
set -euo pipefail

STATE_DIR=${1:-${VLMOPT_SLURM_DIR:-/tmp/vlmopt-slurm}}
GPUS=${VLMOPT_SLURM_GPUS:-2}
MEM_MB=${VLMOPT_SLURM_MEM_MB:-131072}
WAIT_S=${VLMOPT_SLURM_WAIT_S:-60}
CTLD_PORT=${VLMOPT_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${VLMOPT_SLURM_SLURMD_PORT:-6818}

say() { echo "start-local-slurm: $*"; }
die() {
    local code=$1
    shift
    echo "start-local-slurm: error: $*" >&2
    [ "$code" -ge 4 ] && echo "start-local-slurm: tests/slurm/stop-local-slurm.sh $STATE_DIR stops what did start" >&2
    exit "$code"
}

[ "$(id -u)" -eq 0 ] || die 2 "must run as root (it installs packages and runs slurmctld/slurmd as root)"
# The daemons live in /usr/sbin, which a PATH passed on from a user may lack.
export PATH=$PATH:/usr/sbin:/sbin

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
CONF_DIR=$STATE_DIR/etc
RUN_DIR=$STATE_DIR/run
LOG_DIR=$STATE_DIR/log
MUNGE_DIR=$STATE_DIR/munge
export SLURM_CONF=$CONF_DIR/slurm.conf
DEFAULT_CONF=/etc/slurm/slurm.conf

# --- Packages ------------------------------------------------------------------------------------
missing=()
for tool in slurmctld slurmd sbatch squeue scontrol; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
command -v munged >/dev/null 2>&1 || missing+=(munged)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 ||
        die 3 "missing ${missing[*]} and no apt-get to install slurm-wlm and munge"
    say "installing slurm-wlm and munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt_log=$STATE_DIR/apt.log
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >"$apt_log" 2>&1; then
        # A machine whose package lists were never fetched: fetch them once and try again.
        { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } >>"$apt_log" 2>&1 ||
            { tail -n 20 "$apt_log" >&2; die 3 "apt-get install slurm-wlm munge failed (full log: $apt_log)"; }
    fi
    for tool in "${missing[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || die 3 "$tool still missing after installing slurm-wlm and munge"
    done
fi
getent passwd munge >/dev/null || die 3 "the munge package did not create the 'munge' user"

# --- Helpers -------------------------------------------------------------------------------------
# A pid file's process, if it is alive and runs the expected program (guards against reused pids).
pid_alive() {
    local pidfile=$1 program=$2 pid exe
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    # Debian installs e.g. /usr/sbin/slurmctld as a link to slurmctld-wlm: compare resolved paths.
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
    [ -n "$exe" ] && [ "${exe% (deleted)}" = "$(readlink -f "$(command -v "$program" || echo "$program")")" ]
}

port_in_use() {
    # /proc/net/tcp lists local ports in hex; state 0A is LISTEN.
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" '$2 ~ p"$" && $4 == "0A" {found=1} END {exit !found}' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

show_log() {
    [ -s "$1" ] && { echo "--- last lines of $1:" >&2; tail -n 15 "$1" >&2; }
    return 0
}

node_state() {
    sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1
}

# --- Default configuration path -----------------------------------------------------------------
# Commands inside a job find the configuration at SLURM's default path only: the executor plugin
# strips SLURM_* variables, SLURM_CONF included, before its `srun` in each job. Link it there,
# unless another configuration is there already (a dangling link left by a removed state
# directory is replaced).
if [ -L "$DEFAULT_CONF" ] && [ "$(readlink "$DEFAULT_CONF")" = "$SLURM_CONF" ]; then
    :
elif [ -e "$DEFAULT_CONF" ]; then
    die 6 "$DEFAULT_CONF already exists (another SLURM configuration on this machine); not replacing it"
else
    mkdir -p "$(dirname "$DEFAULT_CONF")"
    ln -sfn "$SLURM_CONF" "$DEFAULT_CONF"
fi

# --- Already up? -----------------------------------------------------------------------------------
NODE=$(hostname -s)
if pid_alive "$MUNGE_DIR/munged.pid" munged && pid_alive "$RUN_DIR/slurmctld.pid" slurmctld &&
    pid_alive "$RUN_DIR/slurmd.pid" slurmd; then
    case "$(node_state)" in
    idle | mixed | allocated)
        say "already running (SLURM_CONF=$SLURM_CONF)"
        exit 0
        ;;
    esac
fi

mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/spool" "$STATE_DIR/ctld" "$STATE_DIR/dev"

# --- Configuration ---------------------------------------------------------------------------------
CPUS=$(nproc)
for ((i = 0; i < GPUS; i++)); do
    ln -sfn /dev/null "$STATE_DIR/dev/nvidia$i"
done

cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by tests/slurm/start-local-slurm.sh: a one-node test cluster.
ClusterName=vlmopt-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket.2
CredType=cred/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No systemd, no cgroups: plain process tracking and no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default a job would take all of the node's memory.
DefMemPerCPU=1000
ReturnToService=2
# Finished jobs stay visible to squeue (the status command of the test) and scontrol for an hour.
MinJobAge=3600
GresTypes=gpu
# The node is what this file says (memory above the machine's, fake GPUs), not what slurmd detects.
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:testgpu:$GPUS State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF

# A typed GPU with device files: a count-only gres would be dropped and drain the node.
cat >"$CONF_DIR/gres.conf" <<EOF
Name=gpu Type=testgpu File=$STATE_DIR/dev/nvidia[0-$((GPUS - 1))]
EOF

# --- munged ----------------------------------------------------------------------------------------
if pid_alive "$MUNGE_DIR/munged.pid" munged; then
    say "munged already running"
else
    # munged refuses a key or socket directory that is not its own.
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 0700 "$MUNGE_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        if command -v mungekey >/dev/null 2>&1; then
            runuser -u munge -- mungekey --create --keyfile="$MUNGE_DIR/munge.key"
        else
            dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
            chown munge:munge "$MUNGE_DIR/munge.key"
            chmod 0400 "$MUNGE_DIR/munge.key"
        fi
    fi
    rm -f "$MUNGE_DIR/munge.socket.2" "$MUNGE_DIR/munge.socket.2.lock"
    runuser -u munge -- "$(command -v munged)" --force \
        --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_DIR/munge.socket.2" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" ||
        { show_log "$MUNGE_DIR/munged.log"; die 4 "munged did not start"; }
    for _ in $(seq 50); do
        [ -S "$MUNGE_DIR/munge.socket.2" ] && pid_alive "$MUNGE_DIR/munged.pid" munged && break
        sleep 0.1
    done
    pid_alive "$MUNGE_DIR/munged.pid" munged || { show_log "$MUNGE_DIR/munged.log"; die 4 "munged did not start"; }
    say "munged started (pid $(cat "$MUNGE_DIR/munged.pid"))"
fi
munge -S "$MUNGE_DIR/munge.socket.2" -n | unmunge -S "$MUNGE_DIR/munge.socket.2" >/dev/null ||
    die 4 "munge round trip through $MUNGE_DIR/munge.socket.2 failed"

# --- slurmctld and slurmd --------------------------------------------------------------------------
start_daemon() {
    local program=$1 port=$2
    shift 2
    if pid_alive "$RUN_DIR/$program.pid" "$program"; then
        say "$program already running"
        return 0
    fi
    port_in_use "$port" && die 6 "port $port is taken by another program: is another SLURM running here?" \
        "Set VLMOPT_SLURM_CTLD_PORT / VLMOPT_SLURM_SLURMD_PORT to free ports."
    rm -f "$RUN_DIR/$program.pid"
    "$(command -v "$program")" "$@" >>"$LOG_DIR/$program.out" 2>&1 ||
        { show_log "$LOG_DIR/$program.out"; show_log "$LOG_DIR/$program.log"; die 4 "$program did not start"; }
    # The daemon writes its pid file once it has forked.
    for _ in $(seq 50); do
        pid_alive "$RUN_DIR/$program.pid" "$program" && break
        sleep 0.1
    done
    pid_alive "$RUN_DIR/$program.pid" "$program" ||
        { show_log "$LOG_DIR/$program.out"; show_log "$LOG_DIR/$program.log"; die 4 "$program did not start"; }
    say "$program started (pid $(cat "$RUN_DIR/$program.pid"))"
}

# -i: ignore unreadable state from an earlier run of this cluster.
start_daemon slurmctld "$CTLD_PORT" -f "$SLURM_CONF" -i
start_daemon slurmd "$SLURMD_PORT" -f "$SLURM_CONF" -N "$NODE"

# --- Wait for the node -----------------------------------------------------------------------------
resumed=0
deadline=$((SECONDS + WAIT_S))
while :; do
    state=$(node_state)
    case "$state" in
    idle | mixed | allocated) break ;;
    drain* | down* | fail*)
        # A node left drained or down by an earlier run of this cluster: return it to service once.
        if [ "$resumed" -eq 0 ]; then
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
            resumed=1
        fi
        ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
        scontrol show node "$NODE" >&2 2>/dev/null || true
        show_log "$LOG_DIR/slurmctld.log"
        show_log "$LOG_DIR/slurmd.log"
        die 5 "node $NODE is '${state:-unknown}', not idle, after ${WAIT_S}s"
    fi
    sleep 0.5
done

echo "export SLURM_CONF=$SLURM_CONF" >"$STATE_DIR/env.sh"
say "node $NODE is $state: $CPUS CPUs, $GPUS fake GPU(s) testgpu, partitions cpu (default) and gpu"
say "use it with: export SLURM_CONF=$SLURM_CONF"
