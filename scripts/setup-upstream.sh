#!/usr/bin/env bash
# Installs llama-cpp-python's OpenAI-compatible server (the real upstream that scripts/upstream.py
# launches for tests and benchmarks) into a venv, once. Prints the venv's python on its last line.
# Honors SATSTREAM_UPSTREAM_PYTHON.
# PyPI has llama-cpp-python only as an sdist, so its wheel is built from source for this CPU
# (~8 min on 2 cores) and kept, with wheels of its dependencies, in the cache's wheels/; the venv
# is installed from there offline. A stamp keyed by the version makes re-runs instant.
set -euo pipefail
if [ -n "${SATSTREAM_UPSTREAM_PYTHON:-}" ]; then echo "$SATSTREAM_UPSTREAM_PYTHON"; exit 0; fi
VERSION="0.3.36"
SPEC="llama-cpp-python[server]==$VERSION"
here="$(cd "$(dirname "$0")" && pwd)"
cache="${SATSTREAM_CACHE:-$HOME/.cache/satstream}"
wheels="$cache/wheels"
venv="$cache/upstream-venv"
py="$venv/bin/python"
stamp="$venv/.satstream-installed"
ready() { [ -x "$py" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$SPEC" ]; }
if ready; then echo "$py"; exit 0; fi

mkdir -p "$wheels"
exec 9>"$cache/.setup-upstream.lock"
flock 9 # parallel first runs wait for one build
if ready; then echo "$py"; exit 0; fi

if ! ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  command -v c++ >/dev/null || "$here/apt-install.sh" g++
  echo "building llama-cpp-python $VERSION from source (~8 min on 2 cores, once)..." >&2
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" \
    python3 -m pip wheel -q --no-deps --no-binary llama-cpp-python -w "$wheels" \
    "llama-cpp-python==$VERSION" >&2
fi

if ! { [ -x "$py" ] && "$py" -m pip --version >/dev/null 2>&1; }; then
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >&2; then
    rm -rf "$venv"
    "$here/apt-install.sh" python3-venv
    python3 -m venv "$venv" >&2
  fi
fi

install() { "$py" -m pip install -q --disable-pip-version-check --no-index --find-links "$wheels" "$SPEC" >&2; }
if ! install 2>/dev/null; then
  # Some dependency's wheel is missing from the cache: fetch wheels (never rebuilding ours).
  python3 -m pip wheel -q --only-binary llama-cpp-python --find-links "$wheels" -w "$wheels" "$SPEC" >&2
  install
fi
"$py" -c "import llama_cpp.server.app, uvicorn; print('llama-cpp-python', llama_cpp.__version__)" >&2
echo "$SPEC" >"$stamp"
echo "$py"
