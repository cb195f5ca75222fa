#!/usr/bin/env bash
# The Python SDK's tests, as CI runs them: builds the wheel (scripts/build-wheel.sh), installs it
# with pytest into a fresh virtual environment, and runs python/tests there against the default
# model (SmolLM2 GGUF) and the release `tpserve` binary (the tests compare with the CLI). The
# tests import the installed wheel, never the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
TPSERVE_DEFAULT_MODEL="${TPSERVE_DEFAULT_MODEL:-$(scripts/fetch-default-model.sh)}"
export TPSERVE_DEFAULT_MODEL
wheel="$(scripts/build-wheel.sh)"
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
export TPSERVE_BIN="$target/release/tpserve"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "$wheel" pytest
cd python/tests
"$work/venv/bin/python" -m pytest -p no:cacheprovider -q "$@"
