#!/usr/bin/env bash
# Runs the whole test suite against a private RabbitMQ broker that this script starts and stops.
# Installs missing Debian packages first (as root). Extra arguments go to `swift test`
# (e.g. scripts/test.sh --filter ChoreoAMQPTests).
set -euo pipefail
cd "$(dirname "$0")/.."

name=${CHOREO_TEST_BROKER:-choreo-test}
port=${CHOREO_TEST_PORT:-5673}

scripts/install-deps.sh
scripts/broker.sh start "$name" "$port"
trap 'scripts/broker.sh stop "$name"' EXIT

export CHOREO_TEST_URL="amqp://guest:guest@127.0.0.1:$port/"
export CHOREO_TEST_BROKER_NAME="$name"
swift build --build-tests
# --no-parallel: some tests restart the broker or close all its connections.
swift test --skip-build --no-parallel "$@"
