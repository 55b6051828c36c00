#!/usr/bin/env bash
# Start moto's server (an SQS stand-in for tests) on 127.0.0.1:5000, in the background,
# through moto_server.py beside this script (which makes moto's SQS backend thread-safe).
# Idempotent: does nothing when it already answers. Run from the repository root.
set -euo pipefail

HOST=127.0.0.1
PORT="${AMGI_MOTO_PORT:-5000}"
URL="http://${HOST}:${PORT}/moto-api/"
VENV="${VENV:-.venv}"
LOG_DIR=.brokers
WAIT_SECONDS="${AMGI_MOTO_WAIT:-60}"

answers() {
    "$VENV/bin/python" - "$URL" <<'PY'
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

if [ ! -x "$VENV/bin/python" ]; then
    echo "moto.sh: no virtual environment at $VENV (create it first)" >&2
    exit 1
fi

if answers; then
    echo "moto: already running on ${HOST}:${PORT}"
    pid=$(cat "$LOG_DIR/moto.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && ! grep -q moto_server.py "/proc/$pid/cmdline" 2>/dev/null; then
        echo "moto: that server may predate moto_server.py (its SQS receives race);" \
            "stop it (kill $pid) and run this script again" >&2
    fi
    exit 0
fi

if [ ! -x "$VENV/bin/moto_server" ]; then
    echo "moto: installing moto[server] into $VENV"
    "$VENV/bin/python" -m pip install --quiet "moto[server]>=5" "aiobotocore[boto3]>=2.13"
fi

mkdir -p "$LOG_DIR"
nohup "$VENV/bin/python" "$(dirname "$0")/moto_server.py" -H "$HOST" -p "$PORT" >"$LOG_DIR/moto.log" 2>&1 &
echo $! >"$LOG_DIR/moto.pid"

deadline=$((SECONDS + WAIT_SECONDS))
until answers; do
    if ! kill -0 "$(cat "$LOG_DIR/moto.pid")" 2>/dev/null; then
        echo "moto: the server exited during startup; see $LOG_DIR/moto.log" >&2
        tail -n 20 "$LOG_DIR/moto.log" >&2 || true
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "moto: not answering on ${URL} after ${WAIT_SECONDS}s; see $LOG_DIR/moto.log" >&2
        exit 1
    fi
    sleep 0.5
done
echo "moto: running on ${HOST}:${PORT} (pid $(cat "$LOG_DIR/moto.pid"))"
