#!/usr/bin/env bash
# Stand up (or check) a single-node SLURM cluster with accounting on this machine.
#
#   sudo tests/slurm/up.sh          # idempotent; a warm rerun takes ~1-2 s
#
# Debian 12 (bookworm), no systemd needed: every daemon is started directly.
#
#   configuration   /etc/slurm/{slurm,slurmdbd,gres,cgroup}.conf   (written by this script)
#   slurm state     /var/spool/slurmctld  /var/spool/slurmd
#   pid files       /run/slurm/*.pid  /run/munge/munged.pid  /run/mysqld/mysqld.pid
#   logs            /var/log/slurm/{slurmctld,slurmd,slurmdbd,mariadb}.log
#   accounting DB   MariaDB, datadir /var/lib/mysql, database slurm_acct_db
#   munge key       /etc/munge/munge.key
#
# The node has the machine's real CPUs and memory plus one fake GPU
# (gres.conf: AutoDetect=off, File=/dev/null), so `--gpus=1` / `--gres=gpu:1`
# jobs schedule without a GPU.  Jobs run as the submitting user, unconfined
# (proctrack/linuxproc, task/none: no cgroups needed).
#
# Environment knobs (defaults in brackets):
#   SLURM_TEST_CLUSTER [gapless]  cluster name (fixed once slurmctld saved state)
#   SLURM_TEST_ACCOUNT [gapless]  account created for the current user (and $SUDO_USER)
#   SLURM_TEST_TIMEOUT [90]       seconds to wait for each daemon
#
# Last line of output on success:
#   slurm up: cluster=... node=... cpus=... mem_mb=... gres=gpu:1 partition=debug account=... (...)
set -Eeuo pipefail

CLUSTER=${SLURM_TEST_CLUSTER:-gapless}
ACCOUNT=${SLURM_TEST_ACCOUNT:-gapless}
TIMEOUT=${SLURM_TEST_TIMEOUT:-90}
PARTITION=debug
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=slurmdbd-test-only

CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_STATE=/var/spool/slurmd

T0=$(date +%s.%N)
log() { printf '[slurm-up] %s\n' "$*" >&2; }
die() { printf '[slurm-up] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "unexpected failure at line $LINENO: $BASH_COMMAND"' ERR

if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "must run as root"
    exec sudo -E "$0" "$@"
fi
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

# --------------------------------------------------------------------------- install
PKGS=(munge mariadb-server slurmctld slurmd slurmdbd slurm-client)
missing=()
for p in "${PKGS[@]}"; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [[ $st == installed ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    # Keep package maintainer scripts from starting daemons (we start them ourselves).
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >/dev/null
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
fi

# --------------------------------------------------------------------------- helpers
# live_pids NAME -> pids of processes whose comm is exactly NAME, zombies excluded
# (PID 1 in a container may reap late; a zombie must not count as a running daemon)
live_pids() { { ps -C "$1" -o pid=,stat= 2>/dev/null || true; } | awk '$2 !~ /^Z/ {print $1}' | tr '\n' ' '; }
alive() { [[ -n $(live_pids "$1") ]]; }

# stop_proc NAME: TERM, wait, KILL
stop_proc() {
    local name=$1 pids i
    pids=$(live_pids "$name")
    [[ -n $pids ]] || return 0
    log "stopping $name (pid $pids)"
    kill -TERM $pids 2>/dev/null || true
    for i in $(seq 1 100); do
        alive "$name" || return 0
        sleep 0.2
    done
    kill -KILL $pids 2>/dev/null || true
    sleep 0.5
}

# wait_for DESCRIPTION COMMAND...  (COMMAND is retried until it succeeds)
wait_for() {
    local what=$1 deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.3
    done
}

# install_file DEST MODE  (content on stdin) -> returns 0 if the file changed
install_file() {
    local dest=$1 mode=$2 tmp
    tmp=$(mktemp "${dest}.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$dest"
    log "wrote $dest"
    return 0
}

show_log() { [[ -f $1 ]] && tail -n 25 "$1" >&2 || true; }

mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$CTLD_STATE" "$SLURMD_STATE"

# --------------------------------------------------------------------------- munge
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0700 /etc/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    stop_proc munged
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    wait_for munged munge_ok || { show_log /var/log/munge/munged.log; die "munged did not come up"; }
fi

# --------------------------------------------------------------------------- mariadb
install -d -o mysql -g mysql -m 0755 /run/mysqld
install -d -o mysql -g mysql -m 0755 /var/lib/mysql
install_file /etc/mysql/mariadb.conf.d/99-slurmdbd.cnf 0644 <<'EOF' || true
# written by tests/slurm/up.sh (values recommended by slurmdbd)
[mysqld]
innodb_lock_wait_timeout = 900
innodb_log_file_size = 64M
max_allowed_packet = 64M
EOF
db_ok() { mariadb-admin --protocol=socket ping >/dev/null 2>&1; }
if ! db_ok; then
    stop_proc mariadbd
    rm -f /run/mysqld/mysqld.pid /run/mysqld/mysqld.sock /run/mysqld/mysqld.sock.lock
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        log "initialising MariaDB datadir"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql \
            --auth-root-authentication-method=socket --skip-test-db >"$LOG_DIR/mariadb-install.log" 2>&1
    fi
    log "starting mariadbd"
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
        --socket=/run/mysqld/mysqld.sock </dev/null >>"$LOG_DIR/mariadb.log" 2>&1 &
    wait_for mariadb db_ok || { show_log "$LOG_DIR/mariadb.log"; die "mariadbd did not come up"; }
fi
mariadb --protocol=socket -uroot <<EOF
CREATE DATABASE IF NOT EXISTS ${DB_NAME};
CREATE USER IF NOT EXISTS '${DB_USER}'@'localhost' IDENTIFIED BY '${DB_PASS}';
ALTER USER '${DB_USER}'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON ${DB_NAME}.* TO '${DB_USER}'@'localhost';
EOF

# --------------------------------------------------------------------------- config files
NODE=$(hostname -s)
[[ -n $NODE ]] || die "empty hostname"
hw=$(slurmd -C | head -n1)   # NodeName=x CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
topo=$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
CPUS=$(sed -n 's/.*\bCPUs=\([0-9]*\).*/\1/p' <<<"$hw")
MEM_REAL=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
[[ -n $CPUS && -n $MEM_REAL ]] || die "cannot parse 'slurmd -C': $hw"
MEM=$((MEM_REAL / 256 * 256))   # rounded down so small fluctuations do not drain the node

dbd_changed=0 slurm_changed=0
install_file "$CONF_DIR/slurmdbd.conf" 0600 <<EOF && dbd_changed=1 || true
# written by tests/slurm/up.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF

install_file "$CONF_DIR/slurm.conf" 0644 <<EOF && slurm_changed=1 || true
# written by tests/slurm/up.sh -- single-node test cluster
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_STATE
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# no cgroups (containers / VMs without delegated cgroup trees)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
PropagateResourceLimits=NONE
MpiDefault=none
MailProg=/bin/true

SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=512
GresTypes=gpu

JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none

ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=30
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
Waittime=0

NodeName=$NODE NodeAddr=127.0.0.1 ${topo}RealMemory=$MEM Gres=gpu:1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

install_file "$CONF_DIR/gres.conf" 0644 <<EOF && slurm_changed=1 || true
# written by tests/slurm/up.sh -- one fake GPU; File= is required (count-only GRES drains the node)
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
EOF

install_file "$CONF_DIR/cgroup.conf" 0644 <<'EOF' && slurm_changed=1 || true
# written by tests/slurm/up.sh -- cgroups are not used (proctrack/linuxproc, task/none)
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF

# --------------------------------------------------------------------------- slurmdbd
dbd_ok() { sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }
if ((dbd_changed)) && alive slurmdbd; then
    log "slurmdbd.conf changed: restarting slurmdbd"
    stop_proc slurmdbd
fi
if ! alive slurmdbd; then
    rm -f "$RUN_DIR/slurmdbd.pid"
    log "starting slurmdbd"
    slurmdbd
fi
wait_for slurmdbd dbd_ok || { show_log "$LOG_DIR/slurmdbd.log"; die "slurmdbd does not answer"; }

# cluster, account and user associations (before slurmctld registers)
sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" ||
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacctmgr -n -P show account "$ACCOUNT" format=account | grep -qx "$ACCOUNT" ||
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" \
        Description="gapless test account" Organization=gapless >/dev/null
users=$(id -un)
[[ -n ${SUDO_USER:-} && ${SUDO_USER} != "$users" ]] && users="$users ${SUDO_USER}"
for u in $users; do
    if [[ -z $(sacctmgr -n -P show assoc where cluster="$CLUSTER" account="$ACCOUNT" user="$u" format=user) ]]; then
        sacctmgr -i add user "$u" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
    fi
done

# --------------------------------------------------------------------------- slurmctld + slurmd
if ((slurm_changed)); then
    for d in slurmd slurmctld; do
        if alive $d; then log "config changed: restarting $d"; stop_proc $d; fi
    done
fi
ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
if ! alive slurmctld; then
    rm -f "$RUN_DIR/slurmctld.pid"
    log "starting slurmctld"
    slurmctld -i
fi
wait_for slurmctld ctld_ok || { show_log "$LOG_DIR/slurmctld.log"; die "slurmctld does not answer"; }

if ! alive slurmd; then
    rm -f "$RUN_DIR/slurmd.pid"
    log "starting slurmd"
    slurmd -N "$NODE"
fi

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }
node_up() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }
deadline=$((SECONDS + TIMEOUT)) resumed=0
until node_up; do
    st=$(node_state)
    if [[ $st =~ drain|down|fail ]] && ((resumed < 3)) && alive slurmd && ((SECONDS > deadline - TIMEOUT + 3)); then
        log "node $NODE is '$st' ($(scontrol show node "$NODE" | sed -n 's/.*Reason=//p')): resuming"
        scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
        resumed=$((resumed + 1))
    fi
    if ((SECONDS >= deadline)); then
        show_log "$LOG_DIR/slurmd.log"; show_log "$LOG_DIR/slurmctld.log"
        die "node $NODE not usable (state '$st')"
    fi
    sleep 0.3
done

sacct_ok() { sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1; }
wait_for sacct sacct_ok || die "sacct does not answer"

dt=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
echo "slurm up: cluster=$CLUSTER node=$NODE cpus=$CPUS mem_mb=$MEM gres=gpu:1 partition=$PARTITION account=$ACCOUNT state=$(node_state) (conf $CONF_DIR, state $CTLD_STATE $SLURMD_STATE, logs $LOG_DIR) in ${dt}s"
