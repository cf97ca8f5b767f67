#!/usr/bin/env bash
# The README's first command: installs what the demo needs (idempotent, cached), builds
# satstream in release mode and runs `satstream demo`: bitcoind -regtest, the server with
# SmolLM2-135M-Instruct, a client wallet with a channel, and one paid chat generation shown
# live. Extra arguments go to the demo, e.g. `scripts/demo.sh --mode atomic --max-sats 40`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prepare.sh
exec "$CARGO_TARGET_DIR/release/satstream" --config config/satstream.toml demo "$@"
