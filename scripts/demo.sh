#!/usr/bin/env bash
# The main job: brings up a private demo broker (port 5674), builds, runs the sample, and stops
# everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

name=choreo-demo
port=${CHOREO_DEMO_PORT:-5674}

scripts/install-deps.sh
scripts/broker.sh start "$name" "$port"
trap 'scripts/broker.sh stop "$name"' EXIT
export CHOREO_URL="amqp://guest:guest@127.0.0.1:$port/"

swift build --product AMQPHello
.build/debug/AMQPHello
