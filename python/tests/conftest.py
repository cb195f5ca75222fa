"""Shared fixtures: the default model (SmolLM2-135M-Instruct GGUF, `scripts/fetch-default-model.sh`),
one engine shared by the tests that only generate, a check after every test that no worker
process it started is left (running or unreaped), and `serve`: a real `tpserve serve` to compare
the SDK's answers with the HTTP API's."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tpserve import LLM

#: Workers of the shared engine, allowed to outlive a test.
SHARED_WORKERS = set()


def worker_children(parent=None):
    """Pids of `tpserve-worker` processes (zombies included) whose parent is `parent` (default:
    this process)."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if comm == "tpserve-worker" and ppid == parent:
            found.add(int(entry.name))
    return found


def alive(pid):
    """Whether `pid` exists at all (a zombie counts)."""
    return Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="session")
def model():
    path = os.environ.get("TPSERVE_DEFAULT_MODEL")
    if not path or not Path(path).is_file():
        pytest.fail("set TPSERVE_DEFAULT_MODEL to the GGUF of scripts/fetch-default-model.sh")
    return path


@pytest.fixture(scope="session")
def tpserve_bin():
    """The `tpserve` CLI of the same build, to compare against."""
    path = os.environ.get("TPSERVE_BIN") or shutil.which("tpserve")
    if not path:
        pytest.fail("set TPSERVE_BIN to the release `tpserve` binary")
    return path


@pytest.fixture(scope="session")
def llm(model):
    before = worker_children()
    engine = LLM(model, max_model_len=1024)
    SHARED_WORKERS.update(worker_children() - before)
    assert SHARED_WORKERS, "the engine started no worker process"
    yield engine
    engine.shutdown()
    assert not (worker_children() & SHARED_WORKERS)
    SHARED_WORKERS.clear()


@pytest.fixture(scope="session")
def http(model, tpserve_bin):
    """`tpserve serve` on the default model, configured as the `llm` fixture's engine."""
    with serve(tpserve_bin, "--model", model, "--max-model-len", "1024") as server:
        yield server


@pytest.fixture(autouse=True)
def no_worker_left():
    before = worker_children()
    yield
    left = worker_children() - before - SHARED_WORKERS
    assert not left, f"worker processes left behind: {sorted(left)}"


def run_python(code, *, env=None, timeout=600):
    """Runs `code` in a fresh interpreter of this environment; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


class Server:
    """A running `tpserve serve` and a JSON client for it (the standard library's)."""

    def __init__(self, url):
        self.url = url

    def post(self, path, body):
        """The JSON answer of POST `path`; raises `HTTPError` (with the body read) on an error."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path}: {e.code} {e.read().decode()}") from None


@contextlib.contextmanager
def serve(tpserve_bin, *args):
    """`tpserve serve --port 0 ARGS...` until the block ends; then SIGTERM, and waits for it (its
    workers are its children: it reaps them before it exits)."""
    child = subprocess.Popen(
        [tpserve_bin, "serve", "--port", "0", "--host", "127.0.0.1", "--print-listening-url",
         *args],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "warn"},
    )
    try:
        url = None
        for line in child.stdout:
            if line.startswith("TPSERVE_LISTENING "):
                url = line.split(" ", 1)[1].strip()
                break
        assert url, f"tpserve serve did not start (status {child.wait()})"
        yield Server(url)
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()
