#!/usr/bin/env bash
# Stop the test cluster of setup.sh: cancel its jobs, then stop its daemons, and remove
# the /etc/slurm links that point into the state folder. The state folder (with the
# daemons' logs) stays until the next setup.sh. Safe to run twice.
#
#   tests/slurm/teardown.sh [STATE_DIR]      (default /tmp/sacpo-slurm-test)
#
# Which processes: setup.sh starts every daemon with SACPO_SLURM_TEST_STATE=<state
# folder> in its environment, and only processes that carry exactly that marker (the
# daemons and their own children, e.g. slurmstepd) are signalled: never by name alone.
# This also finds the daemons of a run whose PID files were lost (a crashed setup).
set -euo pipefail

STATE=${1:-${SACPO_SLURM_STATE:-/tmp/sacpo-slurm-test}}
MARK="SACPO_SLURM_TEST_STATE=$STATE"
export SLURM_CONF=/etc/slurm/slurm.conf

# marked_pids [NAME]: PIDs whose environment carries the marker (and whose binary is
# NAME; Debian's slurmctld and slurmd binaries are slurmctld-wlm and slurmd-wlm)
marked_pids() {
    local environ pid exe
    for environ in /proc/[0-9]*/environ; do
        pid=${environ#/proc/}
        pid=${pid%/environ}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        if [[ $# -gt 0 ]]; then
            exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || continue
            exe=${exe##*/}
            [[ ${exe%-wlm} == "$1" ]] || continue
        fi
        # (kernel threads, zombies and processes that just ended have no readable one)
        if { tr '\0' '\n' <"$environ"; } 2>/dev/null | grep -qxF -- "$MARK"; then
            echo "$pid"
        fi
    done
}

# stop PIDS...: SIGTERM, then SIGKILL to those still running (not zombies) after 10 s
stop() {
    local pid i alive
    (($# > 0)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        alive=()
        for pid in "$@"; do
            [[ -d /proc/$pid ]] && [[ $(awk '/^State:/ {print $2}' "/proc/$pid/status" \
                2>/dev/null) != Z ]] && alive+=("$pid")
        done
        ((${#alive[@]} > 0)) || return 0
        sleep 0.25
    done
    echo "teardown.sh: ${alive[*]} ignored SIGTERM; killing" >&2
    kill -KILL "${alive[@]}" 2>/dev/null || true
}

# Jobs first, while slurmctld and slurmd still run, so that no job outlives the
# cluster (proctrack/linuxproc kills a cancelled job's processes).
if [[ -n $(marked_pids slurmctld) && -L /etc/slurm/slurm.conf ]]; then
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
    # shellcheck disable=SC2046  # one argument per PID
    stop $(marked_pids "$daemon")
done
# anything else that carries the marker (e.g. a slurmstepd or slurmscriptd left behind)
# shellcheck disable=SC2046
stop $(marked_pids)
rm -rf "$STATE/pids"

for name in slurm.conf slurmdbd.conf gres.conf; do
    link=/etc/slurm/$name
    if [[ -L $link && $(readlink "$link") == "$STATE"/* ]]; then
        rm -f "$link"
    fi
done
