#!/usr/bin/env bash
# The main job: the order-fulfillment choreography, end to end, on a private broker (port 5674).
# Starts each service as its own process, places four kinds of order, shows how each one flowed,
# dead-letters the one whose shipping keeps failing, fixes shipping and replays it, prints the final
# state, and stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

name=choreo-demo
port=${CHOREO_DEMO_PORT:-5674}
metrics_port=${CHOREO_DEMO_METRICS_PORT:-9464} # inventory serves its metrics there, as Prometheus would scrape them
bin=.build/debug
state=.choreo/demo
services=(order-service inventory payment shipping notifications)

scripts/install-deps.sh
echo "== building"
swift build 2>&1 | tail -n 1
scripts/broker.sh start "$name" "$port"

rm -rf "$state" && mkdir -p "$state"
export CHOREO_URL="amqp://guest:guest@127.0.0.1:$port/"
export CHOREO_STATE_DIR="$state"
export CHOREO_LOG_LEVEL=warning
declare -A pids=()

cleanup() {
    for s in "${!pids[@]}"; do kill -TERM "${pids[$s]}" 2>/dev/null || true; done
    for s in "${!pids[@]}"; do wait "${pids[$s]}" 2>/dev/null || true; done
    scripts/broker.sh stop "$name"
}
trap cleanup EXIT

start() {
    local service=$1; shift
    env "$@" "$bin/$service" >> "$state/$service.log" 2>&1 &
    pids[$service]=$!
}

# Waits (at most $1 seconds) until the command in the remaining arguments succeeds.
wait_for() {
    local limit=$1; shift
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then echo "timed out waiting for: $*" >&2; return 1; fi
        sleep 0.2
    done
}

consumers_ready() { # every handler of the given service has a consumer
    local json
    json=$("$bin/choreo" status --json) || return 1
    python3 - "$1" "$json" <<'PY'
import json, sys
rows = [json.loads(l) for l in sys.argv[2].splitlines() if l.strip()]
mine = [r for r in rows if r["service"] == sys.argv[1]]
sys.exit(0 if mine and all((r.get("consumers") or 0) > 0 for r in mine) else 1)
PY
}

running() { # waits (at most 60 s) until every handler of the service consumes; stops at once if it exited
    local deadline=$((SECONDS + 60))
    until consumers_ready "$1"; do
        if ! kill -0 "${pids[$1]}" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            echo "$1 is not consuming; the end of its log ($state/$1.log):" >&2
            tail -n 5 "$state/$1.log" >&2
            return 1
        fi
        sleep 0.2
    done
}

order_status() { "$bin/order-service" show --order "$1" | head -n 1 | grep -q "$2"; }
customer_messages() { # notifications hears the outcomes on queues of its own and may lag the order view
    python3 -c 'import sqlite3, sys; sys.exit(sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM messages").fetchone()[0] < int(sys.argv[2]))' \
        "$state/notifications.state.sqlite" "$1"
}
dead_letters() { [ "$("$bin/choreo" dlq list --json | wc -l)" -ge "$1" ]; }

echo "== starting ${services[*]}, each its own process"
for s in "${services[@]}"; do
    if [ "$s" = inventory ]; then start "$s" CHOREO_METRICS="127.0.0.1:$metrics_port"; else start "$s"; fi
done
for s in "${services[@]}"; do running "$s"; done
"$bin/choreo" graph

echo
echo "== placing orders"
fulfilled=$("$bin/order-service" place --customer ada --sku widget --quantity 2 --amount-cents 2500 --address "1 Main Street")
echo "  $fulfilled: 2 widgets, paid, shipped"
outofstock=$("$bin/order-service" place --customer bob --sku gadget --quantity 50 --amount-cents 5000)
echo "  $outofstock: 50 gadgets, only 5 in stock"
declined=$("$bin/order-service" place --customer cy --sku gizmo --quantity 3 --amount-cents 99900)
echo "  $declined: 999.00, over the card limit: the payment fails and the hold is released"
stuck=$("$bin/order-service" place --customer dee --sku widget --quantity 1 --amount-cents 1200 --address "Nowhere 0")
echo "  $stuck: an address the carrier rejects: shipping fails, retries, dead-letters"

wait_for 60 order_status "$fulfilled" FULFILLED
wait_for 60 order_status "$outofstock" REJECTED
wait_for 60 order_status "$declined" CANCELLED
wait_for 60 dead_letters 1

echo
echo "== how each order flowed (causal order, [service/handler])"
"$bin/order-service" show

echo
echo "== dead letters"
"$bin/choreo" dlq list

echo
echo "== fixing shipping (SHIPPING_ACCEPT_ALL_ADDRESSES=1) and replaying"
kill -TERM "${pids[shipping]}"; wait "${pids[shipping]}" 2>/dev/null || true
start shipping SHIPPING_ACCEPT_ALL_ADDRESSES=1
running shipping
"$bin/choreo" dlq replay --all --handler shipping.schedule-shipment
wait_for 60 order_status "$stuck" FULFILLED
wait_for 60 customer_messages 4

echo
echo "== final state"
"$bin/order-service" show | grep '^order'
python3 - "$state" <<'PY'
import sqlite3, sys
d = sys.argv[1]
print("customer messages:")
for (text,) in sqlite3.connect(f"{d}/notifications.state.sqlite").execute("SELECT text FROM messages ORDER BY rowid"):
    print("  " + text)
g = sqlite3.connect(f"{d}/payment-gateway.state.sqlite")
charges = g.execute("SELECT count(*) FROM charges WHERE outcome = 'approved'").fetchone()[0]
print(f"gateway: {charges} approved charges, one per paid order")
PY
"$bin/choreo" dlq list

echo
echo "== inventory's events by outcome, from its metrics (http://127.0.0.1:$metrics_port/metrics)"
python3 - "$metrics_port" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
for line in body.splitlines():
    if line.startswith("choreo_events_total{") and not line.endswith(" 0"):
        print("  " + line)
PY
echo "demo finished"
