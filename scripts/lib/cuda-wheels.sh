# shellcheck shell=bash
# Sourced by scripts/check-kernels.sh and scripts/prebuild-kernels.sh: NVIDIA's CUDA 13.0 tools,
# headers and NVRTC from PyPI wheels (no system CUDA, no GPU needed), fetched once and cached
# under ${TPSERVE_CACHE_DIR:-$HOME/.cache/tpserve}/tools/cuda-nvcc-13.0:
#   nvidia-cuda-nvcc     nvcc, ptxas (bin/)
#   nvidia-nvvm          cicc and libdevice, which nvcc runs
#   nvidia-cuda-crt      crt/ headers nvcc includes implicitly
#   nvidia-cuda-runtime  cuda_runtime.h, cuda_bf16.h, cuda_fp16.h
#   nvidia-cuda-cccl     libcu++ (include/cccl: <nv/target>, which cuda_fp16.h includes)
#   nvidia-cuda-nvrtc    libnvrtc.so.13
#   nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm  SASS listings of CUBINs (13.5: PyPI has no 13.0
#                        build; they read 13.0's CUBINs)
# All unpack into one tree, nvidia/cu13/ ($CUDA_ROOT), the layout PyTorch's CUDA wheels use on the
# GPU machine. Needs python3 with pip and unzip. Defines the variables below and
# install_cuda_wheels; changes no shell option of the script that sources it.

# The cache directory of the wheels, and the CUDA tree in it (bin/, include/, lib/).
CUDA_WHEELS_DIR="${TPSERVE_CACHE_DIR:-$HOME/.cache/tpserve}/tools/cuda-nvcc-13.0"
CUDA_ROOT="$CUDA_WHEELS_DIR/nvidia/cu13"
# shellcheck disable=SC2034 # the wheel sets are for the scripts that source this file
{
  # nvcc and what it runs (it also needs the headers below).
  CUDA_NVCC_WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88)
  # The headers the kernels include, for NVRTC and nvcc alike (vector_types.h includes
  # crt/host_defines.h).
  CUDA_HEADER_WHEELS=(
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88
  )
  # NVRTC itself (lib/libnvrtc.so.13).
  CUDA_NVRTC_WHEELS=(nvidia-cuda-nvrtc==13.0.88)
  # cuobjdump and the nvdisasm it runs (bin/).
  CUDA_SASS_WHEELS=(nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37)
}

# Installs the wheels named in "$@" into CUDA_WHEELS_DIR unless already there (a marker file per
# wheel). Progress goes to stderr.
install_cuda_wheels() {
  local missing=() spec
  for spec in "$@"; do
    [[ -f "$CUDA_WHEELS_DIR/.installed/$spec" ]] || missing+=("$spec")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  local dl
  dl="$(mktemp -d)"
  echo "fetching ${missing[*]}" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.11 -d "$dl" "${missing[@]}" >&2
  mkdir -p "$CUDA_WHEELS_DIR/.installed"
  local whl
  for whl in "$dl"/*.whl; do
    unzip -qo "$whl" -d "$CUDA_WHEELS_DIR"
  done
  rm -rf "$dl"
  # Wheels do not keep the executable bit through unzip.
  chmod +x "$CUDA_ROOT"/bin/* "$CUDA_ROOT"/nvvm/bin/* 2>/dev/null || true
  for spec in "${missing[@]}"; do
    touch "$CUDA_WHEELS_DIR/.installed/$spec"
  done
}
