#!/usr/bin/env bash
# Builds the Python wheel of python/ (PyO3, abi3: one wheel for CPython 3.9 and later): the
# release tpserve-worker binary is copied into the package (python/tpserve/bin/, where the engine
# looks for it), then `maturin build --release`. maturin comes from PyPI into a virtual
# environment beside the build output when it is not on PATH. Prints the wheel's path on stdout;
# everything else goes to stderr.
#
#   scripts/build-wheel.sh                                       # for this machine (x86_64 here)
#   scripts/build-wheel.sh --target aarch64-unknown-linux-gnu    # cross-built for 64-bit Arm Linux
#
# --target cross-builds the worker and the extension with Debian's cross compiler
# (gcc-aarch64-linux-gnu, installed with apt-get when missing and running as root) as linker;
# the Rust target must be installed (`rustup target add aarch64-unknown-linux-gnu`). The wheel is
# then for that machine and cannot be tried on this one.
set -euo pipefail
cd "$(dirname "$0")/.."
rust_target=""
while [ $# -gt 0 ]; do
  case "$1" in
    --target) rust_target="${2:?--target needs a Rust target triple}"; shift 2 ;;
    --target=*) rust_target="${1#--target=}"; shift ;;
    *) echo "build-wheel.sh: unknown argument $1 (--target TRIPLE)" >&2; exit 2 ;;
  esac
done
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
maturin_args=(--release --manifest-path python/Cargo.toml)
if [ -z "$rust_target" ]; then
  # The whole workspace, as every other script builds it, so this adds no build of its own.
  cargo build --release --workspace --bins >&2
  worker="$target/release/tpserve-worker"
  wheel_glob="tpserve-*_$(uname -m).whl"
else
  case "$rust_target" in
    aarch64-unknown-linux-gnu) gcc=aarch64-linux-gnu-gcc; package=gcc-aarch64-linux-gnu; arch=aarch64 ;;
    *) echo "build-wheel.sh: --target $rust_target is not supported (aarch64-unknown-linux-gnu)" >&2; exit 2 ;;
  esac
  if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx "$rust_target"; then
    echo "build-wheel.sh: the Rust target $rust_target is not installed: rustup target add $rust_target" >&2
    exit 1
  fi
  if ! command -v "$gcc" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "build-wheel.sh: installing Debian's $package (the cross linker)" >&2
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >&2
    else
      echo "build-wheel.sh: $gcc is missing: install Debian's $package" >&2
      exit 1
    fi
  fi
  env_triple="$(echo "$rust_target" | tr 'a-z-' 'A-Z_')"
  export "CARGO_TARGET_${env_triple}_LINKER=$gcc"
  export "CC_${rust_target//-/_}=$gcc"
  cargo build --release --target "$rust_target" -p tpserve-worker --bin tpserve-worker >&2
  worker="$target/$rust_target/release/tpserve-worker"
  maturin_args+=(--target "$rust_target")
  wheel_glob="tpserve-*_${arch}.whl"
fi
mkdir -p python/tpserve/bin
cp "$worker" python/tpserve/bin/tpserve-worker
maturin="$(command -v maturin || true)"
if [ -z "$maturin" ]; then
  tools="$target/python-build-tools"
  if [ ! -x "$tools/bin/maturin" ]; then
    python3 -m venv "$tools" >&2
    "$tools/bin/pip" install --quiet --disable-pip-version-check 'maturin>=1.7,<2' >&2
  fi
  maturin="$tools/bin/maturin"
fi
out="$target/wheels"
rm -f "$out"/$wheel_glob
"$maturin" build "${maturin_args[@]}" --out "$out" >&2
ls "$out"/$wheel_glob
