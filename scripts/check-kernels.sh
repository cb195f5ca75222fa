#!/usr/bin/env bash
# Compiles every CUDA kernel of kernels/cuda/ to PTX, without a GPU, so a broken kernel fails CI:
#   1. `nvcc -ptx` (warnings are errors) for every kernels/cuda/*.cu, for each architecture in
#      KERNEL_ARCHS, and `nvcc -c` of the standalone kernel harnesses tests/gpu/*.cu (sm_90a);
#   2. unless CHECK_KERNELS_NVRTC=0: tpserve-kernels' tests with the real NVRTC 13.0 library on
#      LD_LIBRARY_PATH, which compile the embedded sources exactly as a worker does at start-up
#      (common.cuh inlined, the include paths of CUDA_INCLUDE_DIR) and check every entry point
#      the Rust side lists is in the PTX, that a second compile comes from the disk cache, and
#      that a prebuilt CUBIN holds every entry point of its source;
#   3. unless CHECK_KERNELS_NVRTC=0: scripts/prebuild-kernels.sh for sm_90a into a temporary
#      directory, a check that its manifest lists every source, then tpserve-kernels' tests built
#      with that bundle embedded and WITHOUT NVRTC on LD_LIBRARY_PATH, which check every source
#      for sm_90a comes from the bundle (so a worker there needs no NVRTC), and
#      scripts/lib/check_prewait_loads.py on the bundle's SASS: the loads kernels issue before
#      waiting for the kernel before them are still before the wait (ptxas moves the wait).
# Every step runs; a summary comes last; the exit status is 1 if any step failed.
#
# The CUDA 13.0 compiler, headers and NVRTC come from PyPI wheels (no system CUDA, no GPU needed),
# fetched once and cached by scripts/lib/cuda-wheels.sh, which lists them.
# Needs python3 with pip, unzip, a host C++ compiler for nvcc (g++), and cargo for steps 2 and 3.
#
# Environment:
#   KERNEL_ARCHS         architectures to compile for with nvcc (default "sm_90a sm_80": Hopper's
#                        wgmma kernel, and the same sources where it compiles to a stub)
#   CHECK_KERNELS_NVRTC  0 skips steps 2 and 3 (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/cuda-wheels.sh
source scripts/lib/cuda-wheels.sh

KERNEL_ARCHS="${KERNEL_ARCHS:-sm_90a sm_80}"
CHECK_KERNELS_NVRTC="${CHECK_KERNELS_NVRTC:-1}"
NVCC="$CUDA_ROOT/bin/nvcc"

FAILED=()
PASSED=()
record() { # name status
  if [[ "$2" -eq 0 ]]; then PASSED+=("$1"); else FAILED+=("$1"); fi
}

start=$SECONDS
install_cuda_wheels "${CUDA_NVCC_WHEELS[@]}" "${CUDA_HEADER_WHEELS[@]}"
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

# The standalone kernel harnesses (run by hand on the GPU machine) must keep compiling against
# the kernels they include.
for src in tests/gpu/*.cu; do
  status=0
  "$NVCC" -c -O3 -arch=sm_90a -std=c++17 -I kernels/cuda -I "$CUDA_ROOT/include" \
    -I "$CUDA_ROOT/include/cccl" "$src" -o "$OUT_DIR/$(basename "$src" .cu).o" || status=$?
  if [[ $status -eq 0 ]]; then echo "ok    nvcc harness $src"; else echo "FAIL  nvcc harness $src"; fi
  record "nvcc harness $src" "$status"
done

if [[ "$CHECK_KERNELS_NVRTC" != 0 ]]; then
  install_cuda_wheels "${CUDA_NVRTC_WHEELS[@]}"
  status=0
  LD_LIBRARY_PATH="$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    CUDA_INCLUDE_DIR="$CUDA_ROOT/include" TPSERVE_REQUIRE_NVRTC=1 \
    cargo test --release -p tpserve-kernels --quiet || status=$?
  record "NVRTC: cargo test -p tpserve-kernels" "$status"

  bundle="$OUT_DIR/prebuilt"
  status=0
  PREBUILT_ARCHS=sm_90a PREBUILT_DIR="$bundle" scripts/prebuild-kernels.sh || status=$?
  if [[ $status -eq 0 ]]; then
    entries="$(grep -c '^sm_90a ' "$bundle/manifest" || true)"
    if [[ "$entries" -ne ${#sources[@]} ]]; then
      echo "FAIL  the bundle's manifest lists $entries sm_90a kernels, not ${#sources[@]}" >&2
      status=1
    fi
  fi
  record "prebuild sm_90a (scripts/prebuild-kernels.sh)" "$status"
  if [[ $status -eq 0 ]]; then
    # The loads our kernels issue before waiting for the kernel before: still there in the SASS.
    install_cuda_wheels "${CUDA_SASS_WHEELS[@]}"
    order=0
    python3 scripts/lib/check_prewait_loads.py "$CUDA_ROOT/bin/cuobjdump" "$bundle"/sm_90a/*.cubin ||
      order=$?
    record "loads before the wait in the sm_90a SASS (scripts/lib/check_prewait_loads.py)" "$order"
  fi
  if [[ $status -eq 0 ]]; then
    # The default LD_LIBRARY_PATH, without the wheels' NVRTC: the bundle alone must serve sm_90a.
    TPSERVE_PREBUILT_KERNELS="$bundle" TPSERVE_REQUIRE_PREBUILT=sm_90a \
      cargo test --release -p tpserve-kernels --quiet || status=$?
    record "embedded bundle serves sm_90a without NVRTC: cargo test -p tpserve-kernels" "$status"
  fi
fi

echo
echo "== check-kernels summary ($((SECONDS - start)) s; tools in $CUDA_WHEELS_DIR)"
for step in "${PASSED[@]}"; do echo "  passed  $step"; done
for step in "${FAILED[@]+"${FAILED[@]}"}"; do echo "  FAILED  $step"; done
[[ ${#FAILED[@]} -eq 0 ]]
