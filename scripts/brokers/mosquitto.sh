#!/usr/bin/env bash
# Install Mosquitto from Debian if missing and start the test instance on 127.0.0.1:1883.
#
# Idempotent: does nothing when the instance already answers. Run from the repository
# root (as root on a fresh Debian 12 machine). Files live under .brokers/mosquitto/PORT/;
# AMGI_MOSQUITTO_PORT chooses another port.
set -euo pipefail

PORT="${AMGI_MOSQUITTO_PORT:-1883}"
ROOT="$(pwd)"
DATA_DIR="$ROOT/.brokers/mosquitto/$PORT"
TEMPLATE="$ROOT/scripts/brokers/mosquitto/mosquitto.conf.in"

source "$(dirname "$0")/../lib/ports.sh"
source "$(dirname "$0")/../lib/apt.sh"

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "mosquitto: installing mosquitto"
    apt_install mosquitto
fi
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"

if port_open "$PORT"; then
    echo "mosquitto: already running on 127.0.0.1:$PORT"
    exit 0
fi

mkdir -p "$DATA_DIR"
sed -e "s|@PORT@|$PORT|" -e "s|@DATA_DIR@|$DATA_DIR|g" -e "s|@PERSISTENCE@|true|" \
    -e "s|@ANONYMOUS@|true|" -e "s|@LISTENER_OPTIONS@||" "$TEMPLATE" >"$DATA_DIR/mosquitto.conf"
"$MOSQUITTO" -c "$DATA_DIR/mosquitto.conf" -d 2>>"$DATA_DIR/stderr.log"

for _ in $(seq 1 100); do
    if port_open "$PORT"; then
        echo "mosquitto: running on 127.0.0.1:$PORT"
        exit 0
    fi
    sleep 0.1
done
echo "mosquitto: did not start on 127.0.0.1:$PORT within 10 s; see $DATA_DIR/mosquitto.log" >&2
tail -n 20 "$DATA_DIR/mosquitto.log" >&2 || true
exit 1
