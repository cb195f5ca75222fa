#!/usr/bin/env python3
"""Checks whether greedy outputs depend on the batch: the same requests sent all at once, then
one at a time, to one `tpserve serve`.

What: starts BIN_DIR/tpserve serve --model MODEL on a free port (plus --serve-arg arguments, e.g.
--batch-invariant), sends --requests greedy /v1/completions concurrently (prompts of different
lengths; half of them share a long prefix, so the solo pass hits the prefix cache where the
concurrent pass computed it), then sends each again alone, and counts the requests whose two
texts are identical. Writes {"identical": k, "total": n, "concurrent_seconds": s, "differing":
[...]} to --out. Exit status 0 when the server ran and answered everything (the count is the
caller's to judge: with --batch-invariant every text must match).

Why: item 8 of the GPU performance issue: `--batch-invariant` makes a request's output
bit-identical alone, in any batch and after a prefix-cache hit.

How: invariance_check.py --bin BIN_DIR --model DIR --out OUT.json [--serve-arg=--batch-invariant]
"""

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--serve-arg", action="append", default=[])
    args = ap.parse_args()
    port = free_port()
    env = dict(os.environ, TPSERVE_WORKER_BINARY=os.path.join(args.bin, "tpserve-worker"))
    cmd = [
        os.path.join(args.bin, "tpserve"), "serve", "--model", args.model, "--device", "cuda",
        "--port", str(port), "--max-model-len", "2048", "--served-model-name", "m",
        *args.serve_arg,
    ]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    log = open(args.out + ".log", "w")
    server = subprocess.Popen(cmd, env=env, stderr=log)
    base = f"http://127.0.0.1:{port}"
    shared = "Shared context for every second request: " + "the river runs to the sea " * 24
    prompts = [
        (shared if i % 2 else "") + f"Request {i}: " + "tell me more " * (1 + 3 * i % 17)
        for i in range(args.requests)
    ]
    body = lambda p: {  # noqa: E731
        "model": "m", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
        "ignore_eos": True,
    }
    try:
        started = time.time()
        while True:
            if server.poll() is not None:
                print(f"invariance_check: the server exited with {server.returncode}",
                      file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - started > 180:
                print("invariance_check: not healthy after 180 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        t = time.time()
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: post(base + "/v1/completions", body(p)), prompts))
        concurrent_seconds = time.time() - t
        alone = [post(base + "/v1/completions", body(p)) for p in prompts]
        texts = [(a["choices"][0]["text"], b["choices"][0]["text"]) for a, b in zip(together, alone)]
        differing = [i for i, (a, b) in enumerate(texts) if a != b]
        result = {
            "identical": len(texts) - len(differing),
            "total": len(texts),
            "concurrent_seconds": concurrent_seconds,
            "differing": differing,
            "serve_args": args.serve_arg,
        }
        with open(args.out, "w") as f:
            json.dump(result, f)
        print(f"invariance_check {args.serve_arg}: {result['identical']}/{result['total']} "
              f"identical alone and together; {concurrent_seconds:.2f} s together",
              file=sys.stderr)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
