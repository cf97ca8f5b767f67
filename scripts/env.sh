# Sourced by the scripts: where builds and downloads are cached (outside the clone, so a fresh
# clone reuses them). Safe to share: cargo keys artifacts by package path and flags.
export SATSTREAM_CACHE="${SATSTREAM_CACHE:-$HOME/.cache/satstream}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SATSTREAM_CACHE/target}"
export PATH="$HOME/.cargo/bin:$PATH"
