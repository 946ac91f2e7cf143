#!/usr/bin/env bash
# Stop the test cluster of setup.sh: cancel its jobs, then stop each daemon by the PID
# that setup.sh recorded (checked against the daemon's binary, so a reused PID is never
# killed), and remove the /etc/slurm links that point into the state folder. The state
# folder (with the daemons' logs) stays until the next setup.sh. Safe to run twice.
#
#   tests/slurm/teardown.sh [STATE_DIR]      (default /tmp/sacpo-slurm-test)
set -euo pipefail

STATE=${1:-${SACPO_SLURM_STATE:-/tmp/sacpo-slurm-test}}
export SLURM_CONF=/etc/slurm/slurm.conf

# pid_of NAME: the recorded PID if that process is still the daemon NAME
pid_of() {
    local file=$STATE/pids/$1 pid exe
    [[ -f $file ]] || return 1
    pid=$(cat "$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    [[ ${exe##*/} == "$1" ]] || return 1
    echo "$pid"
}

stop() {
    local pid i
    pid=$(pid_of "$1") || { rm -f "$STATE/pids/$1"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.25
    done
    if [[ -d /proc/$pid ]]; then
        echo "teardown.sh: $1 ($pid) ignored SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/pids/$1"
}

[[ -d $STATE/pids ]] || exit 0

# Jobs first, while slurmctld and slurmd still run, so that no job step outlives the
# cluster (proctrack/linuxproc kills a cancelled job's processes).
if pid_of slurmctld >/dev/null && [[ -L /etc/slurm/slurm.conf ]]; then
    jobs=$(timeout -s KILL 5 squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086  # one argument per job id
        timeout -s KILL 10 scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            [[ -z $(timeout -s KILL 5 squeue -h -o %A 2>/dev/null || true) ]] && break
            sleep 0.25
        done
    fi
fi

for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
    stop "$daemon"
done

for name in slurm.conf slurmdbd.conf gres.conf; do
    link=/etc/slurm/$name
    if [[ -L $link && $(readlink "$link") == "$STATE"/* ]]; then
        rm -f "$link"
    fi
done
