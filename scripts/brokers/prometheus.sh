#!/usr/bin/env bash
# Install Prometheus (the server and promtool) from Debian if missing.
#
# Idempotent. Nothing is started here: each metrics test starts its own Prometheus on a
# free loopback port with a configuration that scrapes the amgi server under test, and
# stops it afterwards.
set -euo pipefail

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; then
        apt-get update >/dev/null
        apt-get install -y --no-install-recommends prometheus >/dev/null
    fi
fi
echo "prometheus: $(prometheus --version 2>&1 | head -n 1) and promtool installed"
