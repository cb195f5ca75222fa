#!/usr/bin/env bash
# The worker's CPU kernels built for 64-bit Arm and tested under QEMU's user-mode emulation on an
# x86_64 machine: the NEON block dots (cpu/quant/own.rs) against the portable loop and the
# dequantized product, and every other CPU unit test of the worker (attention, the activations'
# quantization, the grouped layout's portable loop) and of its host sampler (sampler::, whose
# whole-row passes the compiler vectorises for each target), plus the quantized GGUF models'
# logits against the f32 path (worker/tests/quantized.rs). Emulation says the code is right, not
# how fast it is. Lints the worker for AArch64 with clippy first. Installs what it needs: the Rust target (rustup), Debian's cross gcc (the linker)
# and qemu-user (apt-get, as root).
#
#   scripts/test-aarch64.sh [TEST FILTER...]     # default: the CPU and sampler unit tests and quantized.rs
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
if ! rustup target list --installed | grep -qx "$target"; then
  # The target's standard library comes from rustup's server, not a package registry: where that
  # server cannot be reached, say so loudly and skip rather than fail the whole CI run.
  if ! timeout 600 rustup target add "$target" >&2; then
    echo "test-aarch64.sh: SKIPPED: rustup could not install $target here; the NEON kernels were not built or tested" >&2
    exit 0
  fi
fi
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "test-aarch64.sh: install Debian's ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
# The code only AArch64 compiles (the NEON loop, c_char as u8) gets clippy's lints too.
cargo clippy --release --target "$target" -p tpserve-worker --lib --tests -- -D warnings
run() {
  cargo test --release --target "$target" -p tpserve-worker "$@"
}
if [ $# -gt 0 ]; then
  run --lib -- "$@"
else
  run --lib -- cpu:: sampler::
  run --test quantized
fi
