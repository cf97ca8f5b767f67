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
# The gateway bench runs a real upstream (llama-cpp-python's server).
if [[ " ${args[*]} " == *" gateway "* ]]; then
  SATSTREAM_UPSTREAM_PYTHON="$(scripts/setup-upstream.sh | tail -n1)"; export SATSTREAM_UPSTREAM_PYTHON
fi
exec "$CARGO_TARGET_DIR/release/satstream" --config config/satstream.toml bench "${args[@]}"
