"""Starting, waiting for and stopping a `tpserve serve` process, and posting JSON to it: shared by
serve_check.py and invariance_check.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bin_dir: str, args: list, log_path: str) -> tuple:
    """Starts BIN_DIR/tpserve serve ARGS --port P (its worker from BIN_DIR); returns (process,
    base URL, log file)."""
    port = free_port()
    env = dict(os.environ, TPSERVE_WORKER_BINARY=os.path.join(bin_dir, "tpserve-worker"))
    cmd = [os.path.join(bin_dir, "tpserve"), "serve", *args, "--port", str(port)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    log = open(log_path, "w")
    return subprocess.Popen(cmd, env=env, stderr=log), f"http://127.0.0.1:{port}", log


def wait_healthy(server, base: str, limit: float = 180) -> float | None:
    """Seconds until /health answered 200, or None (with the reason on stderr) when the server
    exited or did not get there within `limit` seconds."""
    started = time.time()
    while True:
        if server.poll() is not None:
            print(f"the server exited with {server.returncode}", file=sys.stderr)
            return None
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - started
        except OSError:
            pass
        if time.time() - started > limit:
            print(f"not healthy after {limit:.0f} s", file=sys.stderr)
            return None
        time.sleep(0.2)


def stop(server, log) -> int:
    """SIGTERM, then kill after 60 s; returns the exit status."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    log.close()
    return server.returncode


def post(url: str, body: dict, timeout: float = 300) -> tuple:
    """(status, JSON body) of a POST; HTTP errors are answers too."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
