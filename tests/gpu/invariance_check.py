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
import sys
import time

import server as srv


def complete(base: str, body: dict) -> dict:
    status, answer = srv.post(base + "/v1/completions", body)
    if status != 200:
        raise RuntimeError(f"completion failed with {status}: {answer}")
    return answer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--serve-arg", action="append", default=[])
    args = ap.parse_args()
    args_serve = [
        "--model", args.model, "--device", "cuda", "--max-model-len", "2048",
        "--served-model-name", "m", *args.serve_arg,
    ]
    server, base, log = srv.start(args.bin, args_serve, args.out + ".log")
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
        if srv.wait_healthy(server, base) is None:
            return 1
        t = time.time()
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: complete(base, body(p)), prompts))
        concurrent_seconds = time.time() - t
        alone = [complete(base, body(p)) for p in prompts]
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
        srv.stop(server, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
