#!/usr/bin/env bash
# Runs the whole test suite against a private RabbitMQ broker that this script starts and stops.
# Installs missing Debian packages first (as root). Extra arguments go to `swift test`
# (e.g. scripts/test.sh --filter ChoreoAMQPTests).
set -euo pipefail
cd "$(dirname "$0")/.."

name=${CHOREO_TEST_BROKER:-choreo-test}
port=${CHOREO_TEST_PORT:-5673}

scripts/install-deps.sh

# No container engine runs here: check that the compose file is valid.
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; }
fi
if command -v docker-compose >/dev/null 2>&1; then
    docker-compose -f docker/compose.yaml config -q
    echo "docker/compose.yaml: valid (docker-compose config)"
else
    echo "docker-compose is not installed: skipped the compose file check (apt-get install docker-compose)" >&2
fi
scripts/broker.sh start "$name" "$port"
# The shared ledger's tests use a private PostgreSQL server beside the broker.
pg_name=${CHOREO_TEST_POSTGRES:-choreo-test-pg}
pg_port=${CHOREO_TEST_POSTGRES_PORT:-5443}
# The tests' scratch files (ledgers, the fixture services' databases, captured output) go in a directory of
# this run's own, removed at the end, so that runs leave nothing behind in /tmp.
scratch=$(mktemp -d "${TMPDIR:-/tmp}/choreo-tests.XXXXXX")
trap 'scripts/broker.sh stop "$name"; scripts/postgres.sh stop "$pg_name"; rm -rf "$scratch"' EXIT
scripts/postgres.sh start "$pg_name" "$pg_port"
CHOREO_TEST_POSTGRES_URL=$(scripts/postgres.sh url "$pg_name")
export CHOREO_TEST_POSTGRES_URL CHOREO_TEST_POSTGRES_NAME="$pg_name"

export CHOREO_TEST_URL="amqp://guest:guest@127.0.0.1:$port/"
export CHOREO_TEST_TLS_PORT=$((port + 1000))
export CHOREO_TEST_TLS_CA="${CHOREO_BROKER_BASE:-/tmp/choreo-brokers}/$name/tls/ca.pem"
export CHOREO_TEST_BROKER_NAME="$name"
swift build --build-tests
# --no-parallel: some tests restart the broker or close all its connections.
TMPDIR="$scratch" swift test --skip-build --no-parallel "$@"
