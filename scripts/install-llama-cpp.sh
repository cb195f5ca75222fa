#!/usr/bin/env bash
# Builds llama.cpp's Python binding (`llama-cpp-python`, with its OpenAI-style server) from PyPI
# into a virtual environment outside the repository, for side-by-side benchmarks only (no test
# depends on it), and prints the environment's python on stdout (progress goes to stderr).
# Idempotent: a finished environment is reused.
#
# The build is not `-march=native`: on the development machines whose CPUs report AMX a native
# build segfaults at the first token (see ../shared/STACK.md), so the SIMD levels are named, and
# AVX-512 only where the CPU has it (an AVX-512 build on an AVX2-only CPU dies of SIGILL).
set -euo pipefail
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
venv="${TPSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tpserve}/tools/llama-cpp-python-$version"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import llama_cpp, llama_cpp.server' 2>/dev/null; then
  echo "$venv/bin/python"; exit 0
fi
args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
if grep -qw avx512f /proc/cpuinfo; then
  args="$args -DGGML_AVX512=ON"
  grep -qw avx512_vbmi /proc/cpuinfo && args="$args -DGGML_AVX512_VBMI=ON"
  grep -qw avx512_vnni /proc/cpuinfo && args="$args -DGGML_AVX512_VNNI=ON"
  grep -qw avx512_bf16 /proc/cpuinfo && args="$args -DGGML_AVX512_BF16=ON"
fi
grep -qw avx_vnni /proc/cpuinfo && args="$args -DGGML_AVX_VNNI=ON"
echo "install-llama-cpp: building llama-cpp-python==$version (CMAKE_ARGS=$args) into $venv; this takes minutes" >&2
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
CMAKE_ARGS="$args" "$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check \
  "llama-cpp-python[server]==$version" >&2
echo "$venv/bin/python"
