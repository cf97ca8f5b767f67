#!/usr/bin/env bash
# The README's first command: installs what the demo needs (idempotent, cached), builds
# satstream in release mode and runs `satstream demo`: bitcoind -regtest, the server with
# SmolLM2-135M-Instruct, a client wallet with a channel, and one paid chat generation shown
# live. Extra arguments go to the demo, e.g. `scripts/demo.sh --mode atomic --max-sats 40`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/apt-install.sh protobuf-compiler cmake pkg-config libboost-dev libevent-dev g++ make python3-pip unzip
BITCOIND_EXE="$(scripts/setup-bitcoind.sh | tail -n1)"; export BITCOIND_EXE
scripts/setup-grpcurl.sh >/dev/null
scripts/setup-model.sh >/dev/null
echo "Building satstream (release; the first build takes ~15 min on 2 cores)..." >&2
cargo build --release --locked --bin satstream
exec "$CARGO_TARGET_DIR/release/satstream" --config config/satstream.toml demo "$@"
