#!/usr/bin/env bash
# Installs the outside clients the HTTP face is tested with, once: the official `openai` Python
# SDK (PyPI) in a venv, and Alby's L402 client `@getalby/lightning-tools` (npm, versions pinned
# by tests/clients/package-lock.json). Prints `<venv python> <node modules dir>` on its last line.
# Honors SATSTREAM_CLIENTS (that same line, when already installed elsewhere).
set -euo pipefail
if [ -n "${SATSTREAM_CLIENTS:-}" ]; then echo "$SATSTREAM_CLIENTS"; exit 0; fi
OPENAI="openai==3.57.0"
here="$(cd "$(dirname "$0")" && pwd)"
clients="$here/../tests/clients"
cache="${SATSTREAM_CACHE:-$HOME/.cache/satstream}"
venv="$cache/clients-venv"
py="$venv/bin/python"
node_dir="$cache/clients-node"
lock_sum="$(sha256sum "$clients/package-lock.json" | cut -d' ' -f1)"
stamp_py="$venv/.satstream-installed"
stamp_node="$node_dir/.satstream-installed"
ready() {
  [ -x "$py" ] && [ "$(cat "$stamp_py" 2>/dev/null)" = "$OPENAI" ] &&
    [ "$(cat "$stamp_node" 2>/dev/null)" = "$lock_sum" ]
}
if ready; then echo "$py $node_dir"; exit 0; fi
mkdir -p "$cache"
exec 9>"$cache/.setup-clients.lock"
flock 9
if ready; then echo "$py $node_dir"; exit 0; fi

if [ "$(cat "$stamp_py" 2>/dev/null)" != "$OPENAI" ]; then
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >&2; then
    rm -rf "$venv"
    "$here/apt-install.sh" python3-venv
    python3 -m venv "$venv" >&2
  fi
  "$py" -m pip install -q --disable-pip-version-check "$OPENAI" >&2
  "$py" -c "import openai; print('openai', openai.__version__)" >&2
  echo "$OPENAI" >"$stamp_py"
fi

if [ "$(cat "$stamp_node" 2>/dev/null)" != "$lock_sum" ]; then
  command -v npm >/dev/null || "$here/apt-install.sh" nodejs npm
  rm -rf "$node_dir"
  mkdir -p "$node_dir"
  cp "$clients/package.json" "$clients/package-lock.json" "$node_dir/"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
  echo "$lock_sum" >"$stamp_node"
fi
echo "$py $node_dir"
