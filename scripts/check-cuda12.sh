#!/usr/bin/env bash
# Checks how far the code is from a CUDA 12 build (issue 16 item 8), without a GPU:
#   1. the whole workspace type-checks against cudarc's CUDA 12.9 bindings (its `cuda-12090`
#      feature in place of `cuda-13000`, in a copy of the committed tree; the checkout is not
#      touched);
#   2. NVRTC 12.9 (from PyPI's nvidia-cuda-nvrtc-cu12, with the cu12 headers) compiles every
#      kernel to CUBIN for each architecture in CUDA12_ARCHS, through tpserve-prebuild-kernels
#      built for CUDA 12, as a CUDA 12 image's bundle would be made.
# Not run by CI and not a CUDA 12 image: that also needs the CUDA 12 runtime libraries (cuBLAS,
# cuBLASLt, NCCL, NVRTC) in the image and a GPU with a driver older than R580 to try it on, which
# no machine here has. CUDA 12.8's bindings lack cuBLASLt's outer-vector FP8 scales
# (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, used by blas_lt.rs), so 12.9 is the floor.
# Needs python3 with pip, unzip, git and cargo. Takes ~5-10 minutes on 2 cores.
#
# Environment:
#   CUDA12_ARCHS  architectures of step 2 (default "sm_80 sm_89 sm_90a")
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA12_ARCHS="${CUDA12_ARCHS:-sm_80 sm_89 sm_90a}"
CACHE="${TPSERVE_CACHE_DIR:-$HOME/.cache/tpserve}/tools/cuda-nvrtc-12.9"
WHEELS=(nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79
  nvidia-cuda-cccl-cu12==12.9.27 nvidia-cuda-nvcc-cu12==12.9.86)

if [[ ! -f "$CACHE/.installed" ]]; then
  dl="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.11 -d "$dl" "${WHEELS[@]}" >&2
  rm -rf "$CACHE" && mkdir -p "$CACHE/wheels"
  for whl in "$dl"/*.whl; do unzip -qo "$whl" -d "$CACHE/wheels"; done
  rm -rf "$dl"
  # One include directory as NVRTC's options take it (compile.rs adds its cccl/ subdirectory):
  # the runtime headers, crt/ from the nvcc wheel, libcu++ under cccl/.
  mkdir -p "$CACHE/include/cccl"
  cp -r "$CACHE/wheels/nvidia/cuda_runtime/include/." "$CACHE/include/"
  cp -r "$CACHE/wheels/nvidia/cuda_nvcc/include/." "$CACHE/include/"
  cp -r "$CACHE/wheels/nvidia/cuda_cccl/include/." "$CACHE/include/cccl/"
  touch "$CACHE/.installed"
fi

TREE="$(mktemp -d)"
trap 'rm -rf "$TREE"' EXIT
git archive HEAD | tar -x -C "$TREE"
sed -i 's/"cuda-13000"/"cuda-12090"/' "$TREE/worker/Cargo.toml" "$TREE/kernels/Cargo.toml"
if grep -rq '"cuda-13000"' "$TREE" --include=Cargo.toml; then
  echo "a Cargo.toml still names cuda-13000 after the switch" >&2
  exit 1
fi
# Its own target directory: cudarc's features differ, so nothing of target/ would be reused.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda12}"

FAILED=0
echo "== 1. cargo check --workspace --all-targets against CUDA 12.9's bindings"
(cd "$TREE" && cargo check --release --workspace --all-targets --quiet) || FAILED=1

echo "== 2. every kernel to CUBIN with NVRTC 12.9: $CUDA12_ARCHS"
read -r -a archs <<< "$CUDA12_ARCHS"
(cd "$TREE" && LD_LIBRARY_PATH="$CACHE/wheels/nvidia/cuda_nvrtc/lib" \
  CUDA_INCLUDE_DIR="$CACHE/include" \
  cargo run --release --quiet -p tpserve-kernels --bin tpserve-prebuild-kernels -- \
  --out "$TREE/prebuilt-cuda12" "${archs[@]}") || FAILED=1

if [[ $FAILED -eq 0 ]]; then
  echo "PASS: the workspace builds against CUDA 12.9 and NVRTC 12.9 compiles every kernel"
else
  echo "FAIL" >&2
fi
exit "$FAILED"
