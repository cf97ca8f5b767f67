#!/usr/bin/env bash
# Runs `satstream bench` (default: --model all, ~10 min on 2 cores): the performance goals on
# the regtest harness, printed as tables and written to docs/benchmarks.md. Installs what it
# needs like the demo (idempotent, cached). Extra arguments go to the bench, e.g.
# `scripts/bench.sh --model tiny --out /tmp/bench.md`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prepare.sh
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--model all)
exec "$CARGO_TARGET_DIR/release/satstream" --config config/satstream.toml bench "${args[@]}"
