#!/usr/bin/env bash
# Install Prometheus (the server and promtool) from Debian if missing.
#
# Idempotent. Nothing is started here: each metrics test starts its own Prometheus on a
# free loopback port with a configuration that scrapes the amgi server under test, and
# stops it afterwards.
set -euo pipefail
source "$(dirname "$0")/../lib/apt.sh"

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    apt_install prometheus
fi
echo "prometheus: $(prometheus --version 2>&1 | head -n 1) and promtool installed"
