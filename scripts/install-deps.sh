#!/usr/bin/env bash
# Installs what Choreo needs from Debian's packages: the RabbitMQ broker, the rabbitmq-c headers,
# pkg-config and PostgreSQL (for the shared ledger's tests). Idempotent: does nothing when everything is
# present. As root it runs apt-get; otherwise it prints the exact command to run and exits 1.
set -euo pipefail

missing=()
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists librabbitmq 2>/dev/null || missing+=(librabbitmq-dev)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
[ -f /usr/include/sqlite3.h ] || missing+=(libsqlite3-dev)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# The shared ledger's tests run a private PostgreSQL server (scripts/postgres.sh).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "choreo: missing packages: ${missing[*]}" >&2
    echo "choreo: install them with: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi

echo "choreo: installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps Debian's postinst from starting a system-wide broker: we run private ones.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    created_policy=1
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi
