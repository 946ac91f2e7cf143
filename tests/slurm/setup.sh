#!/usr/bin/env bash
# Bring up a one-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) for
# tests/test_slurm.py. Needs root and the Debian packages
#   slurmctld slurmd slurm-client munge slurmdbd mariadb-server
#
#   tests/slurm/setup.sh [STATE_DIR]      (default /tmp/sacpo-slurm-test)
#   tests/slurm/teardown.sh [STATE_DIR]
#
# Idempotent: it first stops what a previous run left (teardown.sh: the processes
# that carry this state folder's marker) and starts from an empty state folder.
# Every daemon gets free ports, its own munge socket and its own database folder, so
# a system munged or MariaDB (or a half-started cluster) does not get in the way. Only slurm.conf,
# slurmdbd.conf and gres.conf are linked into /etc/slurm (required: the jobstep
# plugin strips SLURM_CONF from the inner srun's environment); a real, non-test
# config there is never overwritten.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${1:-${SACPO_SLURM_STATE:-/tmp/sacpo-slurm-test}}
PYTHON=${PYTHON:-python3}
MARKER="sacpo-slurm-test-config"
CLUSTER=sacpotest
# Every daemon is started with this in its environment: teardown.sh stops exactly the
# processes that carry it.
MARK="SACPO_SLURM_TEST_STATE=$STATE"
export SLURM_CONF=/etc/slurm/slurm.conf

die() { echo "setup.sh: $*" >&2; exit 1; }

dump_logs() {
    local f
    for f in "$STATE"/*.log "$STATE"/*.out "$STATE"/munge/munged.log; do
        [[ -f $f ]] || continue
        echo "---- $f (last 30 lines)" >&2
        tail -n 30 "$f" >&2 || true
    done
}

fail() { echo "setup.sh: $*" >&2; dump_logs; exit 1; }

# poll SECONDS COMMAND...: retry COMMAND every 0.25 s; false if it never succeeds
poll() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.25
    done
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll, or fail with the daemons' logs
wait_for() {
    local seconds=$1 what=$2
    shift 2
    poll "$seconds" "$@" || fail "timed out after ${seconds}s waiting for $what"
}

# record NAME PID: check that the daemon runs and carries the marker; note its PID
has_marker() { tr '\0' '\n' <"/proc/$1/environ" | grep -qxF -- "$MARK"; }
record() {
    # `env` and `setsid` exec the daemon: its environment shows the marker once it runs
    poll 5 has_marker "$2" || fail "$1 ($2) exited at once, or lacks the marker"
    echo "$2" >"$STATE/pids/$1"
}

[[ $(id -u) == 0 ]] || die "must run as root"
for cmd in munged munge unmunge mariadbd mariadb mariadb-admin mariadb-install-db \
    slurmdbd slurmctld slurmd sacctmgr scontrol sinfo sbatch sacct runuser setsid; do
    command -v "$cmd" >/dev/null || die "'$cmd' not found (apt-get install slurmctld slurmd" \
        "slurm-client munge slurmdbd mariadb-server)"
done
[[ $STATE == /* && $STATE != / ]] || die "state folder must be an absolute path: $STATE"

# 1. What a previous run left: its daemons, then its state folder (only if it is ours).
bash "$HERE/teardown.sh" "$STATE"
if [[ -e $STATE ]]; then
    [[ -f $STATE/.$MARKER ]] || die "$STATE exists and was not made by this script"
    rm -rf "$STATE"
fi
mkdir -p "$STATE"/{etc,pids,ctld,slurmd,munge}
chmod 755 "$STATE"
touch "$STATE/.$MARKER"

# /etc/slurm: replace only links (ours, or dangling); refuse a real cluster's config.
mkdir -p /etc/slurm
for name in slurm.conf slurmdbd.conf gres.conf; do
    target=/etc/slurm/$name
    if [[ -L $target ]]; then
        if [[ -e $target ]] && ! grep -q "$MARKER" "$target"; then
            die "$target links to a config not made by this script; not touching it"
        fi
    elif [[ -e $target ]]; then
        die "$target exists (a real SLURM config?); not touching it"
    fi
done

# 2. Ports, host, hardware.
read -r CTLD_PORT SLURMD_PORT DBD_PORT DB_PORT < <("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
HOST=$(hostname -s)
# The node as slurmd sees it ("CPUs=2 Boards=1 ... RealMemory=24105"), with at least
# MIN_CPUS CPUs (SlurmdParameters=config_overrides lets it claim more than it has, so
# that small jobs of one thread each run side by side on a 2-core CI machine instead of
# waiting for each other's status checks) and RealMemory lowered by 10%, so that slurmd
# never finds less than configured.
MIN_CPUS=${SACPO_SLURM_MIN_CPUS:-4}
NODE_HW=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //' | awk -v min="$MIN_CPUS" '{
    cpus = 0
    for (i = 1; i <= NF; i++) {
        split($i, kv, "=")
        if (kv[1] == "CPUs") cpus = kv[2]
        if (kv[1] == "RealMemory") mem = int(kv[2] * 0.9)
    }
    if (cpus >= min) {
        for (i = 1; i <= NF; i++) if ($i ~ /^RealMemory=/) $i = "RealMemory=" mem
        print
    } else {
        printf "CPUs=%d Boards=1 SocketsPerBoard=1 CoresPerSocket=%d ThreadsPerCore=1 " \
            "RealMemory=%d\n", min, min, mem
    }
}')
[[ $NODE_HW == *CPUs=* ]] || die "unexpected 'slurmd -C' output: $NODE_HW"
DB_PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
MUNGE_SOCKET=$STATE/munge/munge.socket

render() {
    sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$HOST|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
        -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" -e "s|@NODE_HW@|$NODE_HW|g" "$1"
    echo "# $MARKER"
}
render "$HERE/slurm.conf.in" >"$STATE/etc/slurm.conf"
render "$HERE/slurmdbd.conf.in" >"$STATE/etc/slurmdbd.conf"
render "$HERE/gres.conf" >"$STATE/etc/gres.conf"
chmod 644 "$STATE/etc/slurm.conf" "$STATE/etc/gres.conf"
chmod 600 "$STATE/etc/slurmdbd.conf"
install -m 755 "$HERE/task_prolog.sh" "$STATE/task_prolog.sh"
for name in slurm.conf slurmdbd.conf gres.conf; do
    ln -sfn "$STATE/etc/$name" "/etc/slurm/$name"
done

# 3. munged, as user munge, with its own key and socket.
chown munge:munge "$STATE/munge"
chmod 711 "$STATE/munge"  # the socket needs x for all
head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
chown munge:munge "$STATE/munge/munge.key"
chmod 400 "$STATE/munge/munge.key"
env "$MARK" runuser -u munge -- munged --socket="$MUNGE_SOCKET" \
    --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/munge/munged.pid" --seed-file="$STATE/munge/munged.seed" \
    --log-file="$STATE/munge/munged.log" </dev/null >"$STATE/munged.out" 2>&1 \
    || fail "munged did not start"
wait_for 10 "munged.pid" test -s "$STATE/munge/munged.pid"
record munged "$(cat "$STATE/munge/munged.pid")"
munge_ok() { munge --socket="$MUNGE_SOCKET" -n | unmunge --socket="$MUNGE_SOCKET"; }
wait_for 10 munged munge_ok

# 4. MariaDB in its own folder, on 127.0.0.1:DB_PORT, and the slurm user.
DB_SOCKET=$STATE/mysqld.sock
mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root \
    --auth-root-authentication-method=socket --skip-test-db \
    >"$STATE/mariadb-install.out" 2>&1 || fail "mariadb-install-db failed"
env "$MARK" setsid mariadbd --no-defaults --datadir="$STATE/mysql" --user=root \
    --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --skip-log-bin \
    --pid-file="$STATE/mysqld.pid" --log-error="$STATE/mysqld.log" \
    --innodb-buffer-pool-size=32M </dev/null >"$STATE/mysqld.out" 2>&1 &
record mariadbd $!
wait_for 30 MariaDB mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping
mariadb --no-defaults --socket="$DB_SOCKET" -u root <<SQL || fail "could not create the DB user"
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# 5. slurmdbd, then the cluster's record in it.
env "$MARK" setsid slurmdbd -D </dev/null >"$STATE/slurmdbd.out" 2>&1 &
record slurmdbd $!
wait_for 30 slurmdbd timeout -s KILL 5 sacctmgr -n list cluster
timeout -s KILL 10 sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
timeout -s KILL 10 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" \
    || fail "cluster $CLUSTER not in the accounting database"

# 6. slurmctld, then slurmd; the node must come up idle.
env "$MARK" setsid slurmctld -D </dev/null >"$STATE/slurmctld.out" 2>&1 &
record slurmctld $!
ctld_up() { timeout -s KILL 5 scontrol ping | grep -q "is UP"; }
wait_for 30 slurmctld ctld_up
env "$MARK" setsid slurmd -D </dev/null >"$STATE/slurmd.out" 2>&1 &
record slurmd $!
node_idle() { [[ $(timeout -s KILL 5 sinfo -h -n "$HOST" -o %t) == idle ]]; }
if ! poll 30 node_idle; then
    # e.g. DOWN after a registration problem: try once to resume it
    timeout -s KILL 5 scontrol update nodename="$HOST" state=resume || true
    wait_for 15 "node $HOST to be idle" node_idle
fi

echo "SLURM test cluster '$CLUSTER' up: node $HOST ($NODE_HW Gres=gpu:fake:2)," \
    "slurmctld :$CTLD_PORT, slurmdbd :$DBD_PORT, MariaDB :$DB_PORT, state $STATE"
