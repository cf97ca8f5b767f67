#!/usr/bin/env bash
# The README's test command: installs what the tests need (idempotent, cached under
# ~/.cache/satstream), then runs the whole test suite in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/apt-install.sh protobuf-compiler cmake pkg-config libboost-dev libevent-dev g++ make python3-pip python3-venv libclang-dev curl
BITCOIND_EXE="$(scripts/setup-bitcoind.sh | tail -n1)"; export BITCOIND_EXE
GRPCURL="$(scripts/setup-grpcurl.sh | tail -n1)"; export GRPCURL
# The real upstream the `openai` backend's tests run against (llama-cpp-python's server;
# its wheel builds from source once, ~8 min, then it is cached).
SATSTREAM_UPSTREAM_PYTHON="$(scripts/setup-upstream.sh | tail -n1)"; export SATSTREAM_UPSTREAM_PYTHON
# And llama.cpp's own server, built once from the same llama.cpp source (~6 min).
SATSTREAM_LLAMA_SERVER="$(scripts/setup-llama-server.sh | tail -n1)"; export SATSTREAM_LLAMA_SERVER
# The outside clients of the HTTP face: the `openai` SDK (PyPI) and an L402 client (npm).
SATSTREAM_CLIENTS="$(scripts/setup-clients.sh | tail -n1)"; export SATSTREAM_CLIENTS
# The chat page is tested in a real headless browser: Debian's Chromium and its ChromeDriver.
scripts/apt-install.sh chromium chromium-driver
cargo fmt --all -- --check
# The server and client build, lint-clean, without the test tooling (harness, bench, tiny model).
cargo clippy --release --locked --no-default-features --lib --bins -- -D warnings
cargo test --release --locked "$@"
