#!/usr/bin/env python3
"""Serves a model with `tpserve serve` (real worker processes, one per GPU, NCCL between them)
and sends it concurrent completions over HTTP.

What: starts BIN_DIR/tpserve serve --model MODEL --device cuda --tensor-parallel-size TP on a free
port, waits for /health, sends --requests greedy /v1/completions at once (max_tokens 32,
ignore_eos), checks every answer is a 200 with 32 completion tokens, stops the server with SIGTERM
(it must exit 0) and writes {"texts": [...], "seconds": ...} to --out. Exit status 0 when all of
that holds.

Why: tests/gpu/run.sh's numerical checks drive the worker in-process; this is the path a user
takes (`tpserve serve --tensor-parallel-size 2` on a 2-GPU machine).

How: serve_check.py --bin BIN_DIR --model DIR --tp 2 --out tp2.json [--requests 8] [--device auto]
     [--serve-arg=--enforce-eager ...]
The server's log goes to OUT.log (its tail is printed at the end); with --device auto or cuda the
engine must report a CUDA device in its "engine ready" line.
"""

import argparse
import concurrent.futures
import json
import re
import sys
import time

import server as srv


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument(
        "--device", default="cuda",
        help="auto or cuda (checked: the engine must report a CUDA device); cpu only to test "
        "this script without a GPU",
    )
    ap.add_argument(
        "--serve-arg", action="append", default=[],
        help="an extra argument for `tpserve serve` (repeatable), e.g. --serve-arg=--enforce-eager",
    )
    args = ap.parse_args()
    serve_args = [
        "--model", args.model, "--device", args.device, "--tensor-parallel-size", str(args.tp),
        "--max-model-len", "2048", "--served-model-name", "random", *args.serve_arg,
    ]
    log_path = args.out + ".log"
    server, base, log = srv.start(args.bin, serve_args, log_path)
    try:
        ready = srv.wait_healthy(server, base)
        if ready is None:
            return 1
        with open(log_path) as f:
            # The log may be coloured: drop ANSI escapes before matching.
            plain = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in f]
        engine = [line.strip() for line in plain if "engine ready" in line]
        # "engine ready in 1.8 s: task generate, cuda (NVIDIA H200 (cuda:0)), tensor-parallel
        # size 1, ..." (the task is there since --task; older builds start with the device)
        on_cuda = any(re.search(r"engine ready in [^:]*: (task \w+, )?cuda \(", line)
                      for line in engine)
        if args.device in ("auto", "cuda") and not on_cuda:
            print(f"serve_check: the engine did not come up on CUDA: {engine}", file=sys.stderr)
            return 1
        prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(args.requests)]
        body = lambda p: {  # noqa: E731
            "model": "random", "prompt": p, "max_tokens": 32, "temperature": 0,
            "ignore_eos": True,
        }
        t = time.time()
        with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
            answers = list(pool.map(lambda p: srv.post(base + "/v1/completions", body(p)), prompts))
        seconds = time.time() - t
        bad = [(s, a) for s, a in answers if s != 200 or a["usage"]["completion_tokens"] != 32]
        texts = [a["choices"][0]["text"] if s == 200 else None for s, a in answers]
        with open(args.out, "w") as f:
            json.dump({"texts": texts, "seconds": seconds, "ready_seconds": ready}, f)
        print(
            f"serve_check: tp {args.tp}: ready in {ready:.1f} s; {len(answers) - len(bad)}/"
            f"{len(answers)} answers of 32 tokens in {seconds:.2f} s",
            file=sys.stderr,
        )
        if bad:
            print(f"serve_check: bad answers: {bad[:2]}", file=sys.stderr)
            return 1
    finally:
        srv.stop(server, log)
        with open(log_path) as f:
            sys.stderr.write(f.read()[-4000:])
    if server.returncode != 0:
        print(f"serve_check: the server exited with {server.returncode} after SIGTERM", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
