"""Shared fixtures: the default model (SmolLM2-135M-Instruct GGUF, `scripts/fetch-default-model.sh`),
one engine shared by the tests that only generate, and a check after every test that no worker
process it started is left (running or unreaped)."""

import os
import shutil
import subprocess
import sys
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
