#!/usr/bin/env python3
"""Many registered LoRA adapters cycling through few GPU slots under load (issue 10's evidence).

What: sends REQUESTS completions to a running `tpserve serve --enable-lora`, request i to
adapter PREFIX{i mod COUNT} (so every adapter is used, most more than once, each time after
many others), CONCURRENCY at a time; checks that every request answers 200 with its tokens;
reads the LoRA counters from /metrics before and after; prints a table and writes JSON.

Why: with COUNT far above --max-loras (GPU slots) and --max-cpu-loras (host cache), adapters
are read from disk (preloaded beside the steps), copied into slots and evicted continuously:
every request must still complete, and the counters show what each load cost.

How: python3 lora_cycle.py PORT OUT.json [--prefix c] [--count 1000] [--requests 2000]
     [--concurrency 64] [--max-tokens 16]
"""

import argparse
import json
import re
import sys
import threading
import time
import urllib.request

COUNTERS = [
    "tpserve:lora_preloads_total", "tpserve:lora_preload_seconds_total",
    "tpserve:lora_disk_loads_total", "tpserve:lora_slot_loads_total",
    "tpserve:lora_slot_evictions_total", "tpserve:lora_slot_load_seconds_total",
]


def counters(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out = {}
    for name in COUNTERS:
        m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("out")
    ap.add_argument("--prefix", default="c")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    before = counters(args.port)
    lock = threading.Lock()
    next_i = [0]
    failures, latencies = [], []

    def worker() -> None:
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= args.requests:
                return
            body = json.dumps({"model": f"{args.prefix}{i % args.count}",
                               "prompt": f"request {i}: tell me about slot cycling",
                               "max_tokens": args.max_tokens, "ignore_eos": True,
                               "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{args.port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
            t = time.time()
            try:
                reply = json.loads(urllib.request.urlopen(req, timeout=600).read())
                tokens = reply["usage"]["completion_tokens"]
                if tokens != args.max_tokens:
                    raise ValueError(f"{tokens} tokens")
                with lock:
                    latencies.append(time.time() - t)
            except Exception as e:  # noqa: BLE001 - every failure is reported, none is fatal
                with lock:
                    failures.append(f"request {i}: {e}")

    started = time.time()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - started
    after = counters(args.port)
    delta = {k.replace("tpserve:lora_", "").replace("_total", ""): after[k] - before[k]
             for k in COUNTERS}
    latencies.sort()
    result = {
        "adapters": args.count, "requests": args.requests, "concurrency": args.concurrency,
        "completed": len(latencies), "failed": len(failures), "failures": failures[:10],
        "wall_s": wall,
        "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
        "latency_p99_s": latencies[int(len(latencies) * 0.99)] if latencies else None,
        **delta,
        "preload_s_mean": delta["preload_seconds"] / max(delta["preloads"], 1),
        "slot_load_s_mean": delta["slot_load_seconds"] / max(delta["slot_loads"], 1),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("| figure | value |\n| --- | --- |")
    for k, v in result.items():
        if k != "failures":
            print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    for f in failures[:10]:
        print(f, file=sys.stderr)
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
