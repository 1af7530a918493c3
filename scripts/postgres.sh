#!/usr/bin/env bash
# A private PostgreSQL server on loopback for the shared ledger's tests: its own data directory and port,
# no systemd, scram-sha-256 passwords.
#
#   scripts/postgres.sh start  NAME PORT   initialize a cluster in $base/NAME, start it on 127.0.0.1:PORT, create
#                                          the role `choreo` (password in $base/NAME/password; it may create
#                                          databases, as tests do) and database `choreo`, wait until it
#                                          answers, print its URL (password masked)
#   scripts/postgres.sh stop   NAME        stop it (fast shutdown) and wait until it is gone
#   scripts/postgres.sh url    NAME        print its URL with the password, for scripts (never logged)
#   scripts/postgres.sh pause  NAME        stop the server and keep its data (tests of a database outage)
#   scripts/postgres.sh resume NAME        start a paused server again, on the same port
#
# State lives in ${CHOREO_POSTGRES_BASE:-/tmp/choreo-postgres}/NAME; `start` wipes it first.
set -euo pipefail

cmd=${1:-}
name=${2:-}
usage="usage: $0 start NAME PORT | stop NAME | url NAME | pause NAME | resume NAME"
[ -n "$cmd" ] && [ -n "$name" ] || { echo "$usage" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
base=${CHOREO_POSTGRES_BASE:-/tmp/choreo-postgres}
dir="$base/$name"

pg_bin() {
    # Debian keeps the server's programs per major version; take the newest installed.
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -n "$d" ] || { echo "choreo: PostgreSQL's server programs are missing (apt-get install postgresql)" >&2; exit 1; }
    echo "$d"
}

as_db_user() {
    # PostgreSQL refuses to run as root: as root we drop to Debian's `postgres` user.
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start_server() {
    # The server outlives this script: it must not inherit descriptors its caller left open (a process
    # library that waits for its child's output to end would wait for the server's exit), so they are
    # closed for it; bash's own (255) is close-on-exec.
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ] && [ "$fd" -ne 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        as_db_user "$(pg_bin)/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o "$(cat "$dir/options")" \
            start </dev/null >/dev/null 2>&1
    )
}

case "$cmd" in
start)
    port=${3:-}
    [ -n "$port" ] || { echo "usage: $0 start NAME PORT" >&2; exit 2; }
    "$here/install-deps.sh"
    bin=$(pg_bin)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_db_user "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    printf '%s' "$password" > "$dir/password"
    printf '%s' "$password" > "$dir/pwfile"
    [ "$(id -u)" -eq 0 ] && chown -R postgres:postgres "$dir"
    chmod 700 "$dir"
    as_db_user "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" --auth=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    rm -f "$dir/pwfile"
    # Loopback only, the socket in the cluster's own directory; fsync stays on (the ledger's promise is durability).
    printf '%s' "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200" > "$dir/options"
    start_server || { cat "$dir/server.log" >&2; exit 1; }
    # Over the cluster's own socket directory; the password goes on standard input, not on a command line.
    as_db_user env PGPASSWORD="$password" "$bin/psql" -q -h "$dir" -p "$port" -U postgres -d postgres \
        -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE ROLE choreo LOGIN CREATEDB PASSWORD '$password';
CREATE DATABASE choreo OWNER choreo;
SQL
    echo "postgres:$port" > "$dir/port"
    echo "postgres $name is up on postgres://choreo:***@127.0.0.1:$port/choreo"
    ;;
stop)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_db_user "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
pause)
    as_db_user "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
resume)
    start_server || { cat "$dir/server.log" >&2; exit 1; }
    ;;
url)
    [ -f "$dir/port" ] || { echo "postgres $name is not running" >&2; exit 1; }
    port=$(cut -d: -f2 "$dir/port")
    echo "postgres://choreo:$(cat "$dir/password")@127.0.0.1:$port/choreo"
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac
