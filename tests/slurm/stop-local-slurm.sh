#!/usr/bin/env bash
# Stop the cluster that tests/slurm/start-local-slurm.sh started in STATE_DIR:
#
#   tests/slurm/stop-local-slurm.sh [STATE_DIR]      (default: $VLMOPT_SLURM_DIR or /tmp/vlmopt-slurm)
#
# Cancels its jobs first, then ends slurmd, slurmctld and munged by the pid files in STATE_DIR
# (SIGTERM, then SIGKILL after 10 s), checking that each pid still runs that program, and removes
# the /etc/slurm/slurm.conf link if it points to STATE_DIR. Nothing else is touched; the
# configuration and logs stay in STATE_DIR. Stopping a stopped cluster is fine.
# Exit codes: 0 stopped (or nothing to stop), 1 a daemon survived SIGKILL.
set -euo pipefail

STATE_DIR=${1:-${VLMOPT_SLURM_DIR:-/tmp/vlmopt-slurm}}
# The daemons live in /usr/sbin, which a PATH passed on from a user may lack.
export PATH=$PATH:/usr/sbin:/sbin
say() { echo "stop-local-slurm: $*"; }

if [ ! -d "$STATE_DIR" ]; then
    say "nothing to stop: $STATE_DIR does not exist"
    exit 0
fi
STATE_DIR=$(cd "$STATE_DIR" && pwd)
RUN_DIR=$STATE_DIR/run
MUNGE_DIR=$STATE_DIR/munge
export SLURM_CONF=$STATE_DIR/etc/slurm.conf

# The pid in a pid file, if that process is alive and runs the expected program.
live_pid() {
    local pidfile=$1 program=$2 pid exe
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    # Debian installs e.g. /usr/sbin/slurmctld as a link to slurmctld-wlm: compare resolved paths.
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
    [ -n "$exe" ] && [ "${exe% (deleted)}" = "$(readlink -f "$(command -v "$program" || echo "$program")")" ] || return 1
    echo "$pid"
}

# Jobs first, while the controller can still end their steps.
if live_pid "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null && command -v squeue >/dev/null 2>&1; then
    jobs=$(timeout 10 squeue -h -o '%A' 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        say "cancelling job(s): $(echo "$jobs" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 20); do
            [ -z "$(timeout 10 squeue -h -t running,completing,pending -o '%A' 2>/dev/null || true)" ] && break
            sleep 0.5
        done
    fi
fi

failed=0
stop_daemon() {
    local pidfile=$1 program=$2 pid
    if ! pid=$(live_pid "$pidfile" "$program"); then
        say "$program not running"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then
        say "$program (pid $pid) ignored SIGTERM for 10 s: sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    if [ -d "/proc/$pid" ]; then
        echo "stop-local-slurm: error: $program (pid $pid) is still running" >&2
        failed=1
        return 0
    fi
    rm -f "$pidfile"
    say "$program (pid $pid) stopped"
}

stop_daemon "$RUN_DIR/slurmd.pid" slurmd
stop_daemon "$RUN_DIR/slurmctld.pid" slurmctld
stop_daemon "$MUNGE_DIR/munged.pid" munged
# The link that the start script made at SLURM's default configuration path, and nothing else.
DEFAULT_CONF=/etc/slurm/slurm.conf
if [ -L "$DEFAULT_CONF" ] && [ "$(readlink "$DEFAULT_CONF")" = "$SLURM_CONF" ]; then
    rm -f "$DEFAULT_CONF"
    say "removed the link $DEFAULT_CONF"
fi
exit "$failed"
