#!/usr/bin/env bash
# Install what the AsyncAPI tests of amgi.app need, idempotently:
#   - Debian's chromium and its WebDriver (the docs page is opened headless);
#   - the npm package @asyncapi/specs (the official AsyncAPI JSON Schemas), into
#     .brokers/npm/node_modules (gitignored), so no schema is fetched at test time.
# Prints nothing on success; on failure, the log of the failed step.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/apt.sh
mkdir -p .brokers
log=.brokers/docs-tools.log
: >"$log"

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    apt_install chromium chromium-driver fonts-dejavu-core >>"$log" 2>&1 \
        || { cat "$log" >&2; echo "docs-tools: installing chromium failed" >&2; exit 1; }
fi

SPECS_VERSION=6.11.1
npm_dir=.brokers/npm
if [ ! -f "$npm_dir/node_modules/@asyncapi/specs/package.json" ] \
    || ! grep -q "\"version\": \"$SPECS_VERSION\"" "$npm_dir/node_modules/@asyncapi/specs/package.json"; then
    command -v npm >/dev/null 2>&1 || {
        apt_install npm >>"$log" 2>&1 \
            || { cat "$log" >&2; echo "docs-tools: installing npm failed" >&2; exit 1; }
    }
    mkdir -p "$npm_dir"
    npm install --prefix "$npm_dir" --no-audit --no-fund --no-save --ignore-scripts \
        "@asyncapi/specs@$SPECS_VERSION" >>"$log" 2>&1 \
        || { cat "$log" >&2; echo "docs-tools: npm install @asyncapi/specs failed" >&2; exit 1; }
fi
