#!/usr/bin/env bash
# Builds Bitcoin Core's bitcoind + bitcoin-cli once per machine from the source tree that the
# crates.io crate libbitcoinkernel-sys ships (no other route to Bitcoin Core exists on machines
# that only reach package registries). Idempotent: a cached build is reused.
#
# Prints the path of the bitcoind binary on its last line.
# Honors BITCOIND_EXE (use that binary, build nothing) and SATSTREAM_CACHE (default ~/.cache/satstream).
set -euo pipefail

KERNEL_CRATE_VERSION=0.4.1
cache="${SATSTREAM_CACHE:-$HOME/.cache/satstream}"
out="$cache/bitcoind-kernel-$KERNEL_CRATE_VERSION"

if [ -n "${BITCOIND_EXE:-}" ]; then
  [ -x "$BITCOIND_EXE" ] || { echo "BITCOIND_EXE=$BITCOIND_EXE is not an executable" >&2; exit 1; }
  echo "$BITCOIND_EXE"; exit 0
fi
if [ -x "$out/bin/bitcoind" ] && [ -x "$out/bin/bitcoin-cli" ]; then
  echo "$out/bin/bitcoind"; exit 0
fi

here="$(cd "$(dirname "$0")" && pwd)"
"$here/apt-install.sh" cmake pkg-config libboost-dev libevent-dev g++ make >&2

# Fetch the crate's source through cargo (the registry is the only reachable source).
fetch_dir="$cache/kernel-fetch"
mkdir -p "$fetch_dir/src"
cat > "$fetch_dir/Cargo.toml" <<TOML
[package]
name = "kernel-fetch"
version = "0.0.0"
edition = "2021"
[dependencies]
libbitcoinkernel-sys = "=$KERNEL_CRATE_VERSION"
TOML
: > "$fetch_dir/src/lib.rs"
(cd "$fetch_dir" && cargo fetch -q) >&2
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
src=$(ls -d "$cargo_home"/registry/src/*/libbitcoinkernel-sys-$KERNEL_CRATE_VERSION/bitcoin 2>/dev/null | head -n1)
[ -n "$src" ] && [ -f "$src/CMakeLists.txt" ] || { echo "Bitcoin Core source not found in cargo's registry cache" >&2; exit 1; }

build="$cache/bitcoind-build"
echo "Building bitcoind from $src (one time, ~6 min on 2 cores)..." >&2
cmake -S "$src" -B "$build" -DBUILD_DAEMON=ON -DBUILD_CLI=ON -DENABLE_WALLET=OFF -DWITH_ZMQ=OFF \
  -DENABLE_IPC=OFF -DWITH_EMBEDDED_ASMAP=OFF -DBUILD_TESTS=OFF -DBUILD_BENCH=OFF \
  -DBUILD_KERNEL_LIB=OFF -DBUILD_TX=OFF -DBUILD_UTIL=OFF -DBUILD_WALLET_TOOL=OFF \
  -DBUILD_FUZZ_BINARY=OFF -DBUILD_GUI=OFF -DBUILD_BITCOIN_BIN=OFF -DBUILD_UTIL_CHAINSTATE=OFF \
  -DENABLE_EXTERNAL_SIGNER=OFF -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$build" -j"$(nproc)" --target bitcoind bitcoin-cli >&2
mkdir -p "$out/bin.tmp"
cp "$build/bin/bitcoind" "$build/bin/bitcoin-cli" "$out/bin.tmp/"
rm -rf "$out/bin" && mv "$out/bin.tmp" "$out/bin"   # atomic publish: a half build is never "cached"
rm -rf "$build"
echo "$out/bin/bitcoind"
