#!/usr/bin/env bash
# Fetches the real, tool-capable chat templates of Qwen2.5-7B-Instruct (Apache-2.0),
# Llama-3.1-8B-Instruct (Llama 3.1 Community License) and Mistral-Nemo-Instruct-2407
# (Apache-2.0) that llama.cpp keeps as test fixtures under models/templates/, from the PyPI
# source distribution llama-cpp-python==0.3.36 (which vendors llama.cpp; a 73 MiB download,
# checked against its pinned SHA-256, never built or installed), and caches the three files.
# Prints the cache folder on stdout. Idempotent: cached copies are reused.
set -euo pipefail
dir="${TPSERVE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tpserve}/chat-templates"
names=(Qwen-Qwen2.5-7B-Instruct.jinja meta-llama-Llama-3.1-8B-Instruct.jinja
  mistralai-Mistral-Nemo-Instruct-2407.jinja)
missing=0
for n in "${names[@]}"; do [ -s "$dir/$n" ] || missing=1; done
if [ "$missing" = 1 ]; then
  mkdir -p "$dir"
  python3 - "$dir" "${names[@]}" <<'PY'
import hashlib, io, re, subprocess, sys, tarfile, urllib.parse, urllib.request

dest, names = sys.argv[1], sys.argv[2:]
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
index = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                       capture_output=True, text=True).stdout.strip() or "https://pypi.org/simple"
page = urllib.request.urlopen(f"{index.rstrip('/')}/llama-cpp-python/").read().decode()
url = next(u for u in re.findall(r'href="([^"]+)"', page) if SDIST in u.split("#")[0])
url = urllib.parse.urljoin(f"{index.rstrip('/')}/llama-cpp-python/", url.split("#")[0])
print(f"downloading {SDIST} (73 MiB) for its chat templates", file=sys.stderr)
data = urllib.request.urlopen(url).read()
if hashlib.sha256(data).hexdigest() != SHA256:
    sys.exit(f"{SDIST}: SHA-256 mismatch")
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    for name in names:
        member = f"llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/{name}"
        with open(f"{dest}/{name}", "wb") as out:
            out.write(tar.extractfile(member).read())
PY
fi
echo "$dir"
