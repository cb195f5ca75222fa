#!/usr/bin/env bash
# tpserve against llama.cpp on the same GGUF and the same cores, in one run: single-stream decode
# (`tpserve bench decode` against llama-cpp-python's in-process generate loop) and serving with
# 8 concurrent streams (`tpserve bench serve` against `tpserve serve` and against llama.cpp's
# OpenAI-compatible server). Prints a table and writes JSON (default bench-vs-llama-cpp.json).
#
#   scripts/bench-vs-llama-cpp.sh [--model M.gguf] [--threads 2] [--result-json out.json]
#
# llama.cpp is built from PyPI on first use (scripts/install-llama-cpp.sh, minutes); no test
# depends on it. The release binaries must be built (cargo build --release --bins).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="$("$here/install-llama-cpp.sh")"
exec "$python" "$here/lib/bench_vs_llama_cpp.py" --repo "$(dirname "$here")" "$@"
