#!/usr/bin/env bash
# Builds llama.cpp's own server, `llama-server`, once: the second real upstream the gateway
# (`backend = "openai"`) is tested against, through llama.cpp's native API (`upstream.api =
# "llama.cpp"`, token ids in and out). Prints the binary's path on its last line. Honors
# SATSTREAM_LLAMA_SERVER.
# Its source is the llama.cpp that llama-cpp-python vendors (PyPI's sdist, the same version
# scripts/setup-upstream.sh builds; nothing else is reachable here), built for this CPU
# (~6 min on 2 cores) into the cache. A stamp keyed by the version makes re-runs instant.
set -euo pipefail
if [ -n "${SATSTREAM_LLAMA_SERVER:-}" ]; then echo "$SATSTREAM_LLAMA_SERVER"; exit 0; fi
VERSION="0.3.36"
here="$(cd "$(dirname "$0")" && pwd)"
cache="${SATSTREAM_CACHE:-$HOME/.cache/satstream}"
dir="$cache/llama-server-$VERSION"
bin="$dir/llama-server"
stamp="$dir/.satstream-installed"
ready() { [ -x "$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$VERSION" ]; }
if ready; then echo "$bin"; exit 0; fi

mkdir -p "$cache/sdists" "$dir"
exec 9>"$cache/.setup-llama-server.lock"
flock 9 # parallel first runs wait for one build
if ready; then echo "$bin"; exit 0; fi

sdist="$cache/sdists/llama_cpp_python-$VERSION.tar.gz"
if [ ! -s "$sdist" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: -d "$cache/sdists" \
    "llama-cpp-python==$VERSION" >&2
fi
command -v c++ >/dev/null || "$here/apt-install.sh" g++
command -v cmake >/dev/null || "$here/apt-install.sh" cmake
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work" "llama_cpp_python-$VERSION/vendor/llama.cpp"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
echo "building llama.cpp's llama-server (llama-cpp-python $VERSION's vendored source, ~6 min on 2 cores, once)..." >&2
# No web UI, no TLS, no downloads: only the API the tests use.
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >&2
cmake --build "$work/build" --target llama-server -j"$(nproc)" >&2
install -m 0755 "$work/build/bin/llama-server" "$bin"
"$bin" --version >&2 2>&1 || true
echo "$VERSION" >"$stamp"
echo "$bin"
