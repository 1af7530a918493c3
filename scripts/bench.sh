#!/usr/bin/env bash
# Release-mode benchmarks against a private broker (port 5675) that this script starts and stops.
#   scripts/bench.sh amqp [options]   ChoreoAMQP vs raw rabbitmq-c: publish with confirms, consume with ack
#   scripts/bench.sh chain [options]  producer -> A -> B -> sink, Choreo vs a rabbitmq-c chain in C
#                                     (--postgres: also Choreo with its ledgers on a private PostgreSQL)
#   scripts/bench.sh chain --hop-cost [--count N] [--rounds N]   CPU per event of one hop alone, Choreo vs C
# Options go to the benchmark executable (--count, --size, --batch, --prefetch, --rounds).
set -euo pipefail
cd "$(dirname "$0")/.."

which=${1:-amqp}
shift || true
name=choreo-bench
port=${CHOREO_BENCH_PORT:-5675}

# CHOREO_BROKER_ERL_ARGS adds Erlang VM flags to the broker (scripts/broker.sh), for experiments such as
# the schedulers' busy wait: CHOREO_BROKER_ERL_ARGS="+sbwt very_short" (Benchmarks/NOTES.md, "Tried and not kept").
scripts/install-deps.sh
scripts/broker.sh start "$name" "$port"
trap 'scripts/broker.sh stop "$name"' EXIT
export CHOREO_URL="amqp://guest:guest@127.0.0.1:$port/"

# A build leaves hundreds of megabytes of dirty pages that the kernel writes back over the next half minute, on
# the disk whose syncs the broker and the ledgers wait for: flushed before the first round, not during it.
settle() { sync; }

case "$which" in
amqp)
    swift build -c release --product AMQPBenchmark
    settle
    .build/release/AMQPBenchmark "$@"
    ;;
chain)
    # --postgres (no value): also the Choreo chain with its ledgers on a private PostgreSQL started here.
    args=()
    for a in "$@"; do
        if [ "$a" = "--postgres" ]; then
            scripts/postgres.sh start choreo-bench-pg 5444
            trap 'scripts/broker.sh stop "$name"; scripts/postgres.sh stop choreo-bench-pg' EXIT
            args+=(--postgres "$(scripts/postgres.sh url choreo-bench-pg)")
        else
            args+=("$a")
        fi
    done
    set -- "${args[@]}"
    # One product per call: given several --product flags, swift build builds only the last.
    swift build -c release --product chain-benchmark
    swift build -c release --product chain-baseline-c
    settle
    .build/release/chain-benchmark "$@"
    ;;
*)
    echo "unknown benchmark '$which' (expected: amqp or chain)" >&2
    exit 2
    ;;
esac
