#!/usr/bin/env bash
# Install Redis from Debian if missing and start the test instance on 127.0.0.1:6379.
#
# Idempotent: does nothing when the port already answers. Run from the repository root
# (as root on a fresh Debian 12 machine). Files live under .brokers/redis/PORT/.
# Environment: AMGI_REDIS_PORT (default 6379), AMGI_REDIS_APPENDONLY (yes/no, default no).
set -euo pipefail

PORT="${AMGI_REDIS_PORT:-6379}"
APPENDONLY="${AMGI_REDIS_APPENDONLY:-no}"
DATA_DIR="$(pwd)/.brokers/redis/$PORT"

source "$(dirname "$0")/../lib/ports.sh"
source "$(dirname "$0")/../lib/apt.sh"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis: installing redis-server"
    apt_install redis-server
fi

if port_open "$PORT"; then
    echo "redis: already running on 127.0.0.1:$PORT"
    exit 0
fi

mkdir -p "$DATA_DIR"
# No snapshots: the shared test instance keeps its data in memory (AOF on request).
redis-server --bind 127.0.0.1 --port "$PORT" --dir "$DATA_DIR" \
    --save "" --appendonly "$APPENDONLY" \
    --daemonize yes --pidfile "$DATA_DIR/redis.pid" --logfile "$DATA_DIR/redis.log"

for _ in $(seq 1 100); do
    if port_open "$PORT" && redis-cli -p "$PORT" ping 2>/dev/null | grep -q PONG; then
        echo "redis: running on 127.0.0.1:$PORT, log in $DATA_DIR/redis.log"
        exit 0
    fi
    sleep 0.1
done
echo "redis.sh: redis-server did not answer on 127.0.0.1:$PORT within 10 s; see $DATA_DIR/redis.log" >&2
tail -n 20 "$DATA_DIR/redis.log" >&2 || true
exit 1
