#!/usr/bin/env python3
"""Checks multi-LoRA serving on the GPU: requests for the base model and three adapters mixed in
one batch give exactly what each gives alone.

What: starts BIN_DIR/tpserve serve --model MODEL --device cuda --batch-invariant --enable-lora
--lora-modules a1=DIR/a1 a2=DIR/a2 a3=DIR/a3 --max-loras 3 --max-lora-rank 16 (plus
--serve-arg arguments, e.g. --tensor-parallel-size 2), checks /v1/models lists the adapters
with the base as their parent, sends --requests greedy /v1/completions round-robin over the
base and the adapters (different prompt lengths, `logprobs` 1, `prompt_logprobs` 1 on every
other request) all at once, then each again alone, and compares text, the generated tokens' log
probabilities and the prompt log probabilities bit for bit (--batch-invariant makes a row's
arithmetic independent of its batch, the LoRA kernels included). Also checks that each adapter
changes the output of the same prompt (an adapter that is silently not applied would pass the
rest). Writes the figures to --out as JSON.

Why: issue 10 (many adapters in one step): prefill chunks and decode steps (CUDA graphs with the
LoRA kernels) that mix adapters and the base, on the CUDA backend.

How: lora_mixed_check.py --bin BIN_DIR --model DIR --adapters DIR --out OUT.json
Exit status 0 when everything matched, 1 otherwise.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import time
import urllib.request

import server as srv

MODELS = ["m", "a1", "a2", "a3"]


def complete(base: str, body: dict) -> dict:
    status, answer = srv.post(base + "/v1/completions", body)
    if status != 200:
        raise RuntimeError(f"completion failed with {status}: {answer}")
    return answer


def fingerprint(answer: dict) -> dict:
    choice = answer["choices"][0]
    prompt = [None if p is None else sorted((k, v["logprob"]) for k, v in p.items())
              for p in choice.get("prompt_logprobs") or []]
    return {"text": choice["text"], "logprobs": choice["logprobs"]["token_logprobs"],
            "prompt_logprobs": prompt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--serve-arg", action="append", default=[])
    args = ap.parse_args()
    modules = [f"{m}={os.path.join(args.adapters, m)}" for m in MODELS[1:]]
    serve = ["--model", args.model, "--device", "cuda", "--max-model-len", "2048",
             "--served-model-name", "m", "--batch-invariant", "--enable-lora",
             "--lora-modules", *modules, "--max-loras", "3", "--max-lora-rank", "16",
             *args.serve_arg]
    server, base, log = srv.start(args.bin, serve, args.out + ".log")
    problems = []

    def body(i: int) -> dict:
        prompt = f"Request {i // 4}: " + "go on " * (1 + 5 * i % 23)
        b = {"model": MODELS[i % len(MODELS)], "prompt": prompt,
             "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 1}
        if i % 2:
            b["prompt_logprobs"] = 1
        return b

    try:
        if srv.wait_healthy(server, base) is None:
            return 1
        with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
            listed = {m["id"]: m.get("parent") for m in json.load(r)["data"]}
        for a in MODELS[1:]:
            if listed.get(a) != "m":
                problems.append(f"/v1/models lists {a} with parent {listed.get(a)!r}, not 'm'")
        t = time.time()
        with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
            together = list(pool.map(lambda i: complete(base, body(i)), range(args.requests)))
        concurrent_seconds = time.time() - t
        alone = [complete(base, body(i)) for i in range(args.requests)]
        differing = [i for i, (a, b) in enumerate(zip(together, alone))
                     if fingerprint(a) != fingerprint(b)]
        if differing:
            problems.append(f"requests {differing} differ alone and mixed")
        # The same prompt (that of request 0) on each model: every adapter must change it.
        same = [fingerprint(complete(base, dict(body(0), model=m)))["logprobs"] for m in MODELS]
        unchanged = [m for m, lps in zip(MODELS[1:], same[1:]) if lps == same[0]]
        if unchanged:
            problems.append(f"adapters {unchanged} give exactly the base model's output")
        result = {
            "identical": args.requests - len(differing), "total": args.requests,
            "concurrent_seconds": concurrent_seconds, "differing": differing,
            "adapters_change_output": not unchanged, "serve_args": args.serve_arg,
            "problems": problems,
        }
        with open(args.out, "w") as f:
            json.dump(result, f)
        print(f"lora_mixed_check: {result['identical']}/{result['total']} identical alone and "
              f"mixed; adapters change the output: {not unchanged}; "
              f"{concurrent_seconds:.2f} s together; problems: {problems}", file=sys.stderr)
    finally:
        srv.stop(server, log)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
