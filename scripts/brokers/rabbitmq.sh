#!/usr/bin/env bash
# Install and start RabbitMQ (Debian package) listening on 127.0.0.1:5672 only.
#
# Idempotent: does nothing when the broker already answers. Runs as root from the
# repository root on Debian 12 (no systemd needed: the server is started detached and
# switches to the rabbitmq user itself). Waits until the node has booted and AMQP answers.
# Environment: RABBITMQ_PORT (default 5672).
set -euo pipefail

PORT="${RABBITMQ_PORT:-5672}"
WAIT_SECONDS=90

# Loopback only: AMQP listener, Erlang port mapper and distribution port.
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT="$PORT"
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"

source "$(dirname "$0")/../lib/ports.sh"
source "$(dirname "$0")/../lib/apt.sh"

if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "rabbitmq: installing rabbitmq-server"
    apt_install rabbitmq-server
fi

if port_open "$PORT" && rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; then
    echo "rabbitmq: already running on 127.0.0.1:$PORT"
    exit 0
fi

if ! rabbitmqctl -q status >/dev/null 2>&1; then
    echo "rabbitmq: starting rabbitmq-server"
    rabbitmq-server -detached
fi

deadline=$((SECONDS + WAIT_SECONDS))
until rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "rabbitmq.sh: the node did not boot within ${WAIT_SECONDS} s; see /var/log/rabbitmq/" >&2
        exit 1
    fi
    sleep 1
done
# A node stopped with `rabbitmqctl stop_app` is up but not serving: start the app.
if ! port_open "$PORT"; then
    rabbitmqctl -q start_app >/dev/null 2>&1 || true
fi
until port_open "$PORT"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "rabbitmq.sh: AMQP did not answer on 127.0.0.1:$PORT within ${WAIT_SECONDS} s" >&2
        exit 1
    fi
    sleep 0.2
done
echo "rabbitmq: running on 127.0.0.1:$PORT (guest/guest), logs in /var/log/rabbitmq/"
