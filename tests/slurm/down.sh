#!/usr/bin/env bash
# Stop the single-node SLURM test cluster started by tests/slurm/up.sh.
#
#   tests/slurm/down.sh              # cancel jobs, stop slurmd, slurmctld, slurmdbd, mariadbd, munged
#   tests/slurm/down.sh --keep-jobs  # do not scancel first (slurmd recovers running steps on next up)
#
# Configuration, spool state, the accounting database and logs are kept, so
# the next up.sh is a plain restart (a few seconds).  Harmless if nothing runs.
set -uo pipefail

keep_jobs=0
[[ ${1:-} == --keep-jobs ]] && keep_jobs=1

if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "[slurm-down] must run as root" >&2; exit 1; }
    exec sudo -E "$0" "$@"
fi
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
log() { printf '[slurm-down] %s\n' "$*" >&2; }

# live_pids NAME -> pids of processes whose comm is exactly NAME, zombies excluded
live_pids() { { ps -C "$1" -o pid=,stat= 2>/dev/null || true; } | awk '$2 !~ /^Z/ {print $1}' | tr '\n' ' '; }

# stop_procs GRACE_SECONDS NAME...: TERM every process whose comm is exactly one
# of NAMEs (all at once), wait up to GRACE_SECONDS, then KILL what is left
stop_procs() {
    local grace=$1 pids="" n i
    shift
    for n in "$@"; do pids+=" $(live_pids "$n")"; done
    pids=$(echo $pids)   # normalise whitespace
    [[ -n $pids ]] || return 0
    log "stopping $* (pid $pids)"
    kill -TERM $pids 2>/dev/null
    for ((i = 0; i < grace * 10; i++)); do
        # done when none of them is alive any more (zombies count as gone)
        ps -o stat= -p "${pids// /,}" 2>/dev/null | grep -qv '^Z' || return 0
        sleep 0.1
    done
    log "still alive after ${grace}s: KILL"
    kill -KILL $pids 2>/dev/null
    sleep 0.3
}

if ((!keep_jobs)) && [[ -n $(live_pids slurmctld) ]] && command -v squeue >/dev/null; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        log "cancelling jobs: $jobs"
        timeout 10 scancel $jobs 2>/dev/null
        for ((i = 0; i < 50; i++)); do
            [[ -z $(timeout 5 squeue -h -o %A 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi

stop_procs 20 slurmd slurmctld
((keep_jobs)) || stop_procs 5 slurmstepd
stop_procs 20 slurmdbd
stop_procs 30 mariadbd munged

rm -f /run/slurm/slurmctld.pid /run/slurm/slurmd.pid /run/slurm/slurmdbd.pid
log "slurm down"
