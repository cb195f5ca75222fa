#!/usr/bin/env bash
# Builds the Python wheel of python/ (PyO3, abi3: one wheel for CPython 3.9 and later): the
# release tpserve-worker binary is copied into the package (python/tpserve/bin/, where the engine
# looks for it), then `maturin build --release`. maturin comes from PyPI into a virtual
# environment beside the build output when it is not on PATH. Prints the wheel's path on stdout;
# everything else goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
# The whole workspace, as every other script builds it, so this adds no build of its own.
cargo build --release --workspace --bins >&2
mkdir -p python/tpserve/bin
cp "$target/release/tpserve-worker" python/tpserve/bin/tpserve-worker
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
rm -f "$out"/tpserve-*.whl
"$maturin" build --release --manifest-path python/Cargo.toml --out "$out" >&2
ls "$out"/tpserve-*.whl
