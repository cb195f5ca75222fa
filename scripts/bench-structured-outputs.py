#!/usr/bin/env python3
"""The cost of structured outputs on a running server (docs/PERFORMANCE.md, issue 13 item 3).

Rounds of two phases against BASE_URL, one after the other:
  plain:  P plain chat requests at once (greedy, ignore_eos, exactly N output tokens each);
  mixed:  the same P plain requests plus one guided by a JSON schema, all at once.
Prints, per phase, the plain requests' decode rate (output tokens / wall time of the phase) and
the guided request's own rate, and the server's mean mask time per guided token from
`tpserve:structured_output_mask_seconds` (sum / count before and after). Standard library only.

usage: bench-structured-outputs.py BASE_URL [--plain 4] [--tokens 64] [--rounds 2]
"""
import argparse
import json
import threading
import time
import urllib.request

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "bio": {"type": "string", "maxLength": 200},
    },
    "required": ["name", "age", "pets", "bio"],
    "additionalProperties": False,
}


def post(base, body):
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def mask_histogram(base):
    text = urllib.request.urlopen(base + "/metrics", timeout=60).read().decode()
    values = {}
    for line in text.splitlines():
        for key in ("_sum", "_count"):
            if line.startswith("tpserve:structured_output_mask_seconds" + key + "{"):
                values[key] = float(line.rsplit(" ", 1)[1])
    return values.get("_sum", 0.0), values.get("_count", 0.0)


def run_phase(base, plain, tokens, guided):
    bodies = [
        {
            "messages": [{"role": "user", "content": f"Tell me a story about cat number {i}."}],
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        for i in range(plain)
    ]
    if guided:
        bodies.append(
            {
                "messages": [{"role": "user", "content": "Describe a person who likes animals."}],
                "max_tokens": tokens,
                "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
            }
        )
    results = [None] * len(bodies)
    ends = [0.0] * len(bodies)

    def one(i):
        results[i] = post(base, bodies[i])
        ends[i] = time.perf_counter()

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    plain_tokens = sum(r["usage"]["completion_tokens"] for r in results[:plain])
    plain_rate = plain_tokens / (max(ends[:plain]) - start)
    out = {"plain_tok_s": round(plain_rate, 1), "plain_tokens": plain_tokens}
    if guided:
        g = results[plain]
        out["guided_tok_s"] = round(g["usage"]["completion_tokens"] / (ends[plain] - start), 1)
        out["guided_tokens"] = g["usage"]["completion_tokens"]
        out["guided_finish"] = g["choices"][0]["finish_reason"]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base_url")
    p.add_argument("--plain", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    base = a.base_url.rstrip("/")
    run_phase(base, 1, 4, True)  # warm-up: compiles the schema once, as the cache keeps it
    for r in range(a.rounds):
        for guided in (False, True):
            s0, c0 = mask_histogram(base)
            res = run_phase(base, a.plain, a.tokens, guided)
            s1, c1 = mask_histogram(base)
            if c1 > c0:
                res["mask_us_mean"] = round((s1 - s0) / (c1 - c0) * 1e6, 1)
                res["masks"] = int(c1 - c0)
            print(json.dumps({"round": r + 1, "phase": "mixed" if guided else "plain", **res}), flush=True)


if __name__ == "__main__":
    main()
