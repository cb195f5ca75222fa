# shellcheck shell=bash
# The environment tpserve needs on a GPU machine whose CUDA libraries come from PyTorch's pip
# packages (the project's GPU test machine: Ubuntu 24.04, driver 580 / CUDA 13). Source it:
#
#   source deploy/gpu-env.sh        (or: . deploy/gpu-env.sh)
#
# It sets, idempotently (sourcing it twice adds nothing twice):
#   LD_LIBRARY_PATH   += the pip packages' CUDA 13 libraries (cuBLAS, cuBLASLt, NVRTC, cudart) and
#                        NCCL, plus a directory with a libnccl.so link (cudarc opens NCCL by that
#                        name; the pip package ships only libnccl.so.2)
#   CUDA_INCLUDE_DIR  =  the CUDA headers NVRTC needs (cuda_bf16.h, cuda_fp16.h, ...)
#   NCCL_NVLS_ENABLE  =  0 (NVLink SHARP off, on every machine we run on)
# TPSERVE_CUDALIBS_DIR (default /tmp/cudalibs) is where the libnccl.so link goes; PYTHON (default
# python3) is the interpreter whose site-packages hold the nvidia packages. The Docker image
# (deploy/Dockerfile) does not need this script: it brings its own libraries and sets the same
# variables. Sourced into an interactive shell, it neither exits that shell nor changes its options.

_tpserve_gpu_env() {
  local sp cu nccl links
  sp="$("${PYTHON:-python3}" -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)" || sp=""
  cu="$sp/nvidia/cu13"
  nccl="$sp/nvidia/nccl/lib"
  if [ -z "$sp" ] || [ ! -d "$cu/lib" ] || [ ! -e "$nccl/libnccl.so.2" ]; then
    echo "gpu-env.sh: no CUDA 13 pip packages under '${sp:-?}' (expected nvidia/cu13/lib and nvidia/nccl/lib/libnccl.so.2); nothing set" >&2
    return 1
  fi
  links="${TPSERVE_CUDALIBS_DIR:-/tmp/cudalibs}"
  mkdir -p "$links" && ln -sf "$nccl/libnccl.so.2" "$links/libnccl.so" || return 1

  local dir
  for dir in "$nccl" "$cu/lib" "$links"; do
    case ":${LD_LIBRARY_PATH:-}:" in
      *":$dir:"*) ;;
      *) LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
  done
  export LD_LIBRARY_PATH
  export CUDA_INCLUDE_DIR="$cu/include"
  export NCCL_NVLS_ENABLE=0
  echo "gpu-env.sh: CUDA libraries from $sp/nvidia; CUDA_INCLUDE_DIR=$CUDA_INCLUDE_DIR" >&2
}
_tpserve_gpu_env
unset -f _tpserve_gpu_env
