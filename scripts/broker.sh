#!/usr/bin/env bash
# A private RabbitMQ broker on loopback: its own node name, data directory and ports, no systemd.
#
#   scripts/broker.sh start  NAME PORT   start node NAME@localhost on 127.0.0.1:PORT (and TLS on PORT+1000,
#                                        with a throw-away CA in $base/NAME/tls), wait until it answers
#   scripts/broker.sh stop   NAME        stop it (and wait until it is gone)
#   scripts/broker.sh status NAME        exit 0 when it answers
#   scripts/broker.sh ctl    NAME ARGS   run rabbitmqctl against it (e.g. stop_app, start_app, add_user)
#
# Several brokers (tests, the demo) run side by side under different names and ports. State lives in
# ${CHOREO_BROKER_BASE:-/tmp/choreo-brokers}/NAME; `start` wipes it first so every run starts clean.
# CHOREO_BROKER_ERL_ARGS, if set, is added to the Erlang VM's flags of a broker being started (after
# RabbitMQ's own, so it overrides them), e.g. "+sbwt very_short" for the schedulers' busy wait.
set -euo pipefail

cmd=${1:-}
name=${2:-}
[ -n "$cmd" ] && [ -n "$name" ] || { echo "usage: $0 start NAME PORT | stop NAME | status NAME | ctl NAME ARGS..." >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
base=${CHOREO_BROKER_BASE:-/tmp/choreo-brokers}
dir="$base/$name"
node="$name@localhost"
bin=/usr/lib/rabbitmq/bin

as_broker_user() {
    # Debian's broker runs as the `rabbitmq` user; as root we drop to it, as anyone else we run as ourselves.
    if [ "$(id -u)" -eq 0 ] && id rabbitmq >/dev/null 2>&1; then
        runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq "$@"
    else
        "$@"
    fi
}

ctl() {
    as_broker_user "$bin/rabbitmqctl" -n "$node" "$@"
}

case "$cmd" in
start)
    port=${3:-}
    [ -n "$port" ] || { echo "usage: $0 start NAME PORT" >&2; exit 2; }
    "$here/install-deps.sh"
    if ctl status >/dev/null 2>&1; then
        echo "broker $node is already running" >&2
        exit 0
    fi
    rm -rf "$dir"
    mkdir -p "$dir/mnesia" "$dir/log"
    echo '[].' > "$dir/enabled_plugins"
    # A throw-away CA and a server certificate for "localhost", for the amqps:// tests.
    mkdir -p "$dir/tls"
    (
        cd "$dir/tls"
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=choreo-test-ca" \
            -keyout ca.key -out ca.pem >/dev/null 2>&1
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr >/dev/null 2>&1
        printf 'subjectAltName=DNS:localhost\n' > san.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile san.ext -out server.pem >/dev/null 2>&1
        chmod 644 ./*.pem ./*.key
    )
    tls_port=$((port + 1000))
    cat > "$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$port
listeners.ssl.default = 127.0.0.1:$tls_port
ssl_options.cacertfile = $dir/tls/ca.pem
ssl_options.certfile = $dir/tls/server.pem
ssl_options.keyfile = $dir/tls/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
loopback_users = none
log.console = false
log.file.level = warning
CONF
    if [ "$(id -u)" -eq 0 ] && id rabbitmq >/dev/null 2>&1; then
        chown -R rabbitmq:rabbitmq "$dir"
    fi
    dist_port=$((port + 20000))
    as_broker_user env \
        RABBITMQ_NODENAME="$node" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$port" \
        RABBITMQ_DIST_PORT="$dist_port" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_PID_FILE="$dir/pid" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="${CHOREO_BROKER_ERL_ARGS:-${RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS:-}}" \
        setsid "$bin/rabbitmq-server" > "$dir/startup.log" 2>&1 < /dev/null &
    # await_startup waits for the pid file; bound it so a broken start fails instead of hanging.
    for _ in $(seq 1 60); do
        if [ -f "$dir/pid" ]; then break; fi
        sleep 0.5
    done
    if ! timeout 90 "$0" ctl "$name" await_startup >/dev/null 2>&1; then
        echo "broker $node did not start; its log:" >&2
        tail -n 40 "$dir/startup.log" >&2 || true
        exit 1
    fi
    echo "broker $node is up on amqp://guest:***@127.0.0.1:$port/ and amqps://localhost:$tls_port/ (CA $dir/tls/ca.pem)" >&2
    if [ -n "${CHOREO_BROKER_ERL_ARGS:-}" ]; then echo "  with the Erlang flags $CHOREO_BROKER_ERL_ARGS" >&2; fi
    ;;
stop)
    if ctl status >/dev/null 2>&1; then
        ctl stop "$dir/pid" >/dev/null 2>&1 || ctl stop >/dev/null 2>&1 || true
    fi
    if [ -f "$dir/pid" ]; then
        pid=$(cat "$dir/pid" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    # The Erlang port mapper outlives the node; stop it too once no other node on this machine uses it.
    epmd_bin=$(ls /usr/lib/erlang/erts-*/bin/epmd 2>/dev/null | head -n 1 || true)
    if [ -n "$epmd_bin" ] && pgrep -x epmd >/dev/null 2>&1; then
        if ! "$epmd_bin" -names 2>/dev/null | grep -q '^name '; then
            "$epmd_bin" -kill >/dev/null 2>&1 || true
        fi
    fi
    ;;
status)
    ctl status >/dev/null 2>&1
    ;;
ctl)
    shift 2
    ctl "$@"
    ;;
*)
    echo "unknown command: $cmd" >&2
    exit 2
    ;;
esac
