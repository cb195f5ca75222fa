#!/usr/bin/env bash
# Runs the aarch64 wheel on this x86_64 machine under emulation: builds it
# (scripts/build-wheel.sh --target aarch64-unknown-linux-gnu), installs it with pytest into a
# fresh virtual environment of an arm64 Debian 12 (CPython 3.11) and runs python/tests there
# against the default model. Every process of the run, Python and the wheel's own tpserve-worker
# alike, is an AArch64 binary run by QEMU's user-mode emulator. Not part of .ci/run (it takes
# tens of minutes: see the README's Python section).
#
#   scripts/test-wheel-aarch64.sh                          # the default subset (SUBSET below)
#   scripts/test-wheel-aarch64.sh test_async.py            # any pytest arguments instead
#   scripts/test-wheel-aarch64.sh --with-cli [ARGS...]     # also an aarch64 `tpserve` CLI
#
# The default subset needs no `tpserve` CLI. The tests that compare with the CLI or with
# `tpserve serve` (greedy text, constructor errors, log probabilities over HTTP, ...) need an
# aarch64 one: --with-cli cross-builds it too (the coordinator once more for aarch64, many
# minutes on two cores) and runs them with it.
#
# Needs root (apt-get, binfmt_misc, chroot). It installs what is missing and leaves it for the
# next run:
#   - Debian's qemu-user-static and debootstrap (apt-get install);
#   - the binfmt_misc registration of qemu-aarch64 (Debian's own line from
#     /usr/lib/binfmt.d/qemu-aarch64.conf, with the F flag, so it works inside a chroot), made
#     when the kernel has none: the emulated Python can then start AArch64 workers by execve;
#   - an arm64 Debian 12 root file system (debootstrap: minbase plus python3-venv, ~300 MB) in
#     ${TPSERVE_CACHE_DIR:-~/.cache/tpserve}/tools/arm64-bookworm.
# /proc, /dev and /dev/pts are bind-mounted into it for the run and unmounted on exit; the wheel, the
# tests and the model are copied in (the model as a hard link where it can be).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
SUBSET=(
  test_generate.py test_async.py test_tensor_parallel.py test_lifecycle.py
  -k "not greedy_output_equals_tpserve_generate and not progress_bar"
)
with_cli=false
if [ "${1:-}" = --with-cli ]; then
  with_cli=true
  shift
fi

if [ "$(id -u)" != 0 ]; then
  echo "test-wheel-aarch64.sh: needs root (apt-get, binfmt_misc, chroot)" >&2
  exit 1
fi
missing=()
command -v qemu-aarch64-static >/dev/null 2>&1 || missing+=(qemu-user-static)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test-wheel-aarch64.sh: installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/register" ]; then
  mount -t binfmt_misc binfmt_misc "$binfmt"
fi
if [ ! -e "$binfmt/qemu-aarch64" ]; then
  echo "test-wheel-aarch64.sh: registering qemu-aarch64 with binfmt_misc" >&2
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > "$binfmt/register"
fi

cache="${TPSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tpserve}"
rootfs="$cache/tools/arm64-bookworm"
if [ ! -e "$rootfs/.tpserve-complete" ]; then
  echo "test-wheel-aarch64.sh: making an arm64 Debian 12 root file system in $rootfs (minutes)" >&2
  rm -rf "$rootfs"
  mkdir -p "$(dirname "$rootfs")"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >&2
  touch "$rootfs/.tpserve-complete"
fi

model="${TPSERVE_DEFAULT_MODEL:-$(scripts/fetch-default-model.sh)}"
wheel="$(scripts/build-wheel.sh --target aarch64-unknown-linux-gnu)"
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
if $with_cli; then
  # The same cross set-up as build-wheel.sh's (which has just checked it).
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  cargo build --release --target aarch64-unknown-linux-gnu -p tpserve-coordinator --bin tpserve >&2
fi

# Everything of this run lives under /run-tpserve in the root file system (the CLI, if any,
# in /run-tpserve/bin).
run="$rootfs/run-tpserve"
cleanup() {
  umount "$rootfs/dev/pts" 2>/dev/null || true
  umount "$rootfs/dev" 2>/dev/null || true
  umount "$rootfs/proc" 2>/dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT
cleanup
mkdir -p "$run/bin"
mount -t proc proc "$rootfs/proc"
mount --bind /dev "$rootfs/dev"
mount --bind /dev/pts "$rootfs/dev/pts" # a bind mount is not recursive: pseudo-terminals too
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
# This machine's certificate authorities (a proxy's, where one is used), for pip in the chroot.
cp "${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}" "$run/ca.crt"
cp "$wheel" "$run/"
cli_env=()
if $with_cli; then
  cp "$target/aarch64-unknown-linux-gnu/release/tpserve" "$run/bin/tpserve"
  cli_env=(TPSERVE_BIN=/run-tpserve/bin/tpserve)
fi
cp -r python/tests "$run/tests"
ln "$model" "$run/model.gguf" 2>/dev/null || cp "$model" "$run/model.gguf"

args=("$@")
[ ${#args[@]} -gt 0 ] || args=("${SUBSET[@]}")
quoted="$(printf ' %q' "${args[@]}")"
started=$(date +%s)
status=0
chroot "$rootfs" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
  TPSERVE_DEFAULT_MODEL=/run-tpserve/model.gguf "${cli_env[@]}" \
  PIP_CERT=/run-tpserve/ca.crt RUST_LOG="${RUST_LOG:-warn}" /bin/sh -euc "
    uname -m
    python3 --version
    python3 -m venv /run-tpserve/venv
    /run-tpserve/venv/bin/pip install --quiet --disable-pip-version-check /run-tpserve/$(basename "$wheel") pytest
    file=\$(/run-tpserve/venv/bin/python -c 'import tpserve._tpserve as m; print(m.__file__)')
    echo \"extension: \$file\"
    cd /run-tpserve/tests
    /run-tpserve/venv/bin/python -m pytest -p no:cacheprovider -q $quoted
  " || status=$?
echo "test-wheel-aarch64.sh: pytest took $(( $(date +%s) - started )) s under emulation (status $status)" >&2

# No process of this run may outlive it: look for any whose root directory is the root file
# system (the conftest already checks each test's own workers after each test).
left=""
for root in /proc/[0-9]*/root; do
  if [ "$(readlink "$root" 2>/dev/null || true)" = "$rootfs" ]; then
    pid="${root#/proc/}"
    left="$left ${pid%/root}"
  fi
done
if [ -n "$left" ]; then
  echo "test-wheel-aarch64.sh: processes left behind:$left" >&2
  status=1
fi
exit "$status"
