# Sourced by the scripts: where builds and downloads are cached (outside the clone, so a fresh
# clone reuses them). Safe to share: cargo keys artifacts by package path and flags.
export SATSTREAM_CACHE="${SATSTREAM_CACHE:-$HOME/.cache/satstream}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SATSTREAM_CACHE/target}"
# satstream (once built), bitcoin-cli and grpcurl (once set up), cargo.
export PATH="$CARGO_TARGET_DIR/release:$SATSTREAM_CACHE/bitcoind-kernel-0.4.1/bin:$SATSTREAM_CACHE/grpcurl:$HOME/.cargo/bin:$PATH"
