# Sourced by demo.sh and bench.sh: installs what a run of satstream needs (idempotent,
# cached) and builds it in release mode. Exports BITCOIND_EXE and the cache paths.
source scripts/env.sh
scripts/apt-install.sh protobuf-compiler cmake pkg-config libboost-dev libevent-dev g++ make python3-pip unzip libclang-dev
BITCOIND_EXE="$(scripts/setup-bitcoind.sh | tail -n1)"; export BITCOIND_EXE
scripts/setup-grpcurl.sh >/dev/null
scripts/setup-model.sh >/dev/null
echo "Building satstream (release; the first build takes ~15 min on 2 cores)..." >&2
cargo build --release --locked --bin satstream
# The Q8_0 weights the default config runs, derived from the shipped Q4_1 by the binary.
scripts/setup-model.sh --requantize "$CARGO_TARGET_DIR/release/satstream" >/dev/null
