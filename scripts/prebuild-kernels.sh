#!/usr/bin/env bash
# Prebuilds tpserve's CUDA kernels: compiles every embedded kernel source to CUBIN with NVRTC 13.0
# for each architecture and writes the bundle kernels/build.rs embeds into the binaries, so a
# worker's first start on those GPUs compiles nothing and needs no NVRTC. Run it before
# `cargo build --release`; cargo reruns the kernels crate's build script when the bundle changes.
# Without a bundle the binaries build and run as before (compiling at the first start).
#
# No GPU and no system CUDA needed: NVRTC and the CUDA headers come from PyPI wheels
# (scripts/lib/cuda-wheels.sh), fetched once and cached. Needs python3 with pip, unzip and cargo.
# The tool (tpserve-prebuild-kernels, in the kernels crate) prints the time and size per
# architecture.
#
# Environment:
#   PREBUILT_ARCHS  architectures, e.g. "sm_80 sm_86 sm_89 sm_90a" (default: the tool's, sm_80,
#                   sm_89 and sm_90a; a worker runs the sm_80 code on sm_86 GPUs too, and
#                   Hopper GPUs always sm_90a, not sm_90)
#   PREBUILT_DIR    where the bundle goes (default kernels/prebuilt, which git ignores); an older
#                   bundle there is replaced
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/cuda-wheels.sh
source scripts/lib/cuda-wheels.sh

PREBUILT_DIR="${PREBUILT_DIR:-kernels/prebuilt}"
read -r -a archs <<< "${PREBUILT_ARCHS:-}"

install_cuda_wheels "${CUDA_HEADER_WHEELS[@]}" "${CUDA_NVRTC_WHEELS[@]}"
LD_LIBRARY_PATH="$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  CUDA_INCLUDE_DIR="$CUDA_ROOT/include" \
  cargo run --release --quiet -p tpserve-kernels --bin tpserve-prebuild-kernels -- \
  --out "$PREBUILT_DIR" "${archs[@]}"
echo "bundle: $PREBUILT_DIR ($(du -sh "$PREBUILT_DIR" | cut -f1))"
