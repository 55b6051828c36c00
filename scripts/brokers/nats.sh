#!/usr/bin/env bash
# Install nats-server from Debian if missing and start the test instance on 127.0.0.1:4222
# with JetStream enabled, its store under .brokers/nats/PORT/.
#
# Idempotent: does nothing when the port already answers. Run from the repository root
# (as root on a fresh Debian 12 machine). Environment: AMGI_NATS_PORT (default 4222).
set -euo pipefail

PORT="${AMGI_NATS_PORT:-4222}"
DATA_DIR="$(pwd)/.brokers/nats/$PORT"
LOG="$DATA_DIR/nats.log"

source "$(dirname "$0")/../lib/ports.sh"
source "$(dirname "$0")/../lib/apt.sh"

if ! command -v nats-server >/dev/null 2>&1; then
    echo "nats: installing nats-server"
    apt_install nats-server
fi

if port_open "$PORT"; then
    echo "nats: already running on 127.0.0.1:$PORT"
    exit 0
fi

mkdir -p "$DATA_DIR/store"
nohup nats-server --addr 127.0.0.1 --port "$PORT" --jetstream --store_dir "$DATA_DIR/store" \
    >"$LOG" 2>&1 </dev/null &
PID=$!
echo "$PID" >"$DATA_DIR/nats.pid"

for _ in $(seq 1 100); do
    if port_open "$PORT" && grep -q "Server is ready" "$LOG"; then
        echo "nats: nats-server (pid $PID) with JetStream on 127.0.0.1:$PORT, log in $LOG"
        exit 0
    fi
    if ! kill -0 "$PID" 2>/dev/null; then
        echo "nats.sh: nats-server exited during startup; last log lines:" >&2
        tail -n 20 "$LOG" >&2 || true
        exit 1
    fi
    sleep 0.1
done
echo "nats.sh: nats-server did not answer on 127.0.0.1:$PORT within 10 s; see $LOG" >&2
exit 1
