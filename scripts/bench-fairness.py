#!/usr/bin/env python3
"""Fair share between tenants under load, measured over HTTP (issue 11's fairness evidence).

What: one `tpserve serve` with a two-tenant gateway policy and `--scheduling-policy fair` on a
small engine (`--max-num-seqs`, default 8), tenant A sending 10x tenant B's load. For each pair of
tier weights (A:B = 1:1 and 1:3 by default), three phases:
  1. B alone, open loop (Poisson arrivals at --b-rate requests/s): B's median time to first token;
  2. both backlogged, closed loops (B keeps --max-num-seqs streams open, A ten times as many):
     output tokens each tenant received during the measured window (after a warm-up);
  3. B's open loop again while A floods (phase 2's A): B's median time to first token.
Expected under fair share: in 2, B's tokens / A's tokens = weight_B / weight_A (within 10%); in
3, B's median TTFT within 2x of phase 1's. Under `--policy fcfs` (for comparison) B gets a
tenth of the tokens and waits behind A's queue.

Prints a table and writes JSON. Only the Python standard library; the model is the default
(`scripts/fetch-default-model.sh`) unless --model says otherwise.

    scripts/bench-fairness.py --tpserve target/release/tpserve --out fairness.json
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

WORDS = ("river mountain city light paper window garden music winter story bread table "
         "yellow quiet ocean letter morning friend candle forest").split()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def policy(weight_a, weight_b, key_a, key_b):
    sha = lambda k: "sha256:" + hashlib.sha256(k.encode()).hexdigest()
    return f"""tiers:
  a: {{weight: {weight_a}}}
  b: {{weight: {weight_b}}}
tenants:
  tenant-a:
    key_hashes: ["{sha(key_a)}"]
    tier: a
  tenant-b:
    key_hashes: ["{sha(key_b)}"]
    tier: b
"""


class Server:
    def __init__(self, args, policy_text, workdir):
        self.port = free_port()
        path = os.path.join(workdir, "policy.yaml")
        with open(path, "w") as f:
            f.write(policy_text)
        self.log = open(os.path.join(workdir, "server.log"), "w")
        cmd = [args.tpserve, "serve", "--model", args.model, "--port", str(self.port),
               "--served-model-name", "m", "--gateway-config", path,
               "--scheduling-policy", args.policy, "--max-num-seqs", str(args.max_num_seqs)]
        cmd += args.server_arg
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the server exited; see {self.log.name}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        sys.exit("the server did not become healthy")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def stream_one(port, key, max_tokens, rng, on_token):
    """One streaming completion; returns its time to first token (s), or None on an error."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(24))
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens,
                       "min_tokens": max_tokens, "temperature": 0, "stream": True})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.time()
    c.request("POST", "/v1/completions", body,
              {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    r = c.getresponse()
    if r.status != 200:
        r.read()
        return None
    ttft = None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
            if ttft is None:
                ttft = time.time() - start
            on_token(time.time())
    c.close()
    return ttft


class Tenant:
    """`streams` closed-loop clients of one tenant until `stop` is set."""

    def __init__(self, name, port, key, streams, max_tokens, stop):
        self.name, self.token_times, self.ttfts = name, [], []
        self.errors, self.lock = 0, threading.Lock()
        self.threads = [threading.Thread(target=self.loop, args=(port, key, max_tokens, stop, i))
                        for i in range(streams)]

    def loop(self, port, key, max_tokens, stop, i):
        rng = random.Random(hash((self.name, i, time.time())))
        while not stop.is_set():
            ttft = stream_one(port, key, max_tokens, rng, self.record)
            with self.lock:
                if ttft is None:
                    self.errors += 1
                else:
                    self.ttfts.append((time.time(), ttft))

    def record(self, t):
        with self.lock:
            self.token_times.append(t)

    def tokens_between(self, t0, t1):
        with self.lock:
            return sum(1 for t in self.token_times if t0 <= t < t1)

    def ttfts_between(self, t0, t1):
        with self.lock:
            return [v for (t, v) in self.ttfts if t0 <= t < t1]


class OpenLoop(Tenant):
    """Requests of one tenant at Poisson arrivals of `rate` per second until `stop` is set."""

    def __init__(self, name, port, key, rate, max_tokens, stop):
        super().__init__(name, port, key, 0, max_tokens, stop)
        self.threads = [threading.Thread(target=self.arrivals,
                                         args=(port, key, rate, max_tokens, stop))]

    def arrivals(self, port, key, rate, max_tokens, stop):
        rng = random.Random(hash((self.name, time.time())))
        requests = []
        while not stop.wait(rng.expovariate(rate)):
            t = threading.Thread(target=self.one, args=(port, key, max_tokens, rng.random()))
            t.start()
            requests.append(t)
        for t in requests:
            t.join()

    def one(self, port, key, max_tokens, seed):
        ttft = stream_one(port, key, max_tokens, random.Random(seed), self.record)
        with self.lock:
            if ttft is None:
                self.errors += 1
            else:
                self.ttfts.append((time.time(), ttft))


def run_phase(port, tenants, warmup, seconds):
    """`tenants`: (name, key, streams) for closed loops, (name, key, "open", rate) for open."""
    stop = threading.Event()
    clients = [OpenLoop(t[0], port, t[1], t[3], args.max_tokens, stop) if len(t) == 4
               else Tenant(t[0], port, t[1], t[2], args.max_tokens, stop) for t in tenants]
    for c in clients:
        for t in c.threads:
            t.start()
    t0 = time.time() + warmup
    time.sleep(warmup + seconds)
    t1 = time.time()
    stop.set()
    for c in clients:
        for t in c.threads:
            t.join()
    return {c.name: {"tokens": c.tokens_between(t0, t1),
                     "tokens_per_s": c.tokens_between(t0, t1) / (t1 - t0),
                     "median_ttft_ms": 1e3 * statistics.median(c.ttfts_between(t0, t1) or [0]),
                     "requests": len(c.ttfts_between(t0, t1)), "errors": c.errors}
            for c in clients}


def main():
    global args
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tpserve", default="target/release/tpserve")
    p.add_argument("--model", default=None, help="default: scripts/fetch-default-model.sh")
    p.add_argument("--policy", default="fair", help="--scheduling-policy (fair, fcfs)")
    p.add_argument("--weights", default="1:1,1:3", help="A:B tier weights, comma-separated")
    p.add_argument("--max-num-seqs", type=int, default=8,
                   help="the engine's slots; B's closed-loop streams (A: 10x)")
    p.add_argument("--b-rate", type=float, default=0.5, help="B's open-loop requests/s")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=45.0)
    p.add_argument("--server-arg", action="append", default=[],
                   help="one more argument for `tpserve serve` (repeatable)")
    p.add_argument("--out", default="fairness.json")
    args = p.parse_args()
    if args.model is None:
        here = os.path.dirname(os.path.abspath(__file__))
        args.model = subprocess.check_output([os.path.join(here, "fetch-default-model.sh")],
                                             text=True).strip()
    key_a, key_b = "key-a-" + os.urandom(8).hex(), "key-b-" + os.urandom(8).hex()
    results = []
    for pair in args.weights.split(","):
        wa, wb = (int(x) for x in pair.split(":"))
        with tempfile.TemporaryDirectory() as work:
            server = Server(args, policy(wa, wb, key_a, key_b), work)
            try:
                streams = args.max_num_seqs
                alone = run_phase(server.port, [("B", key_b, "open", args.b_rate)], 2.0,
                                  args.seconds)
                both = run_phase(server.port, [("A", key_a, 10 * streams),
                                               ("B", key_b, streams)],
                                 args.warmup, args.seconds)
                flood = run_phase(server.port, [("A", key_a, 10 * streams),
                                                ("B", key_b, "open", args.b_rate)],
                                  args.warmup, args.seconds)
            finally:
                server.stop()
        a, b = both["A"], both["B"]
        share = b["tokens"] / max(a["tokens"], 1)
        expected = wb / wa
        results.append({
            "weights": f"{wa}:{wb}", "policy": args.policy, "server_args": args.server_arg,
            "b_alone": alone["B"], "a_together": a, "b_together": b,
            "b_under_flood": flood["B"], "a_flooding": flood["A"],
            "b_to_a_tokens": share, "expected_b_to_a": expected,
            "share_error": abs(share - expected) / expected,
            "b_ttft_vs_alone": flood["B"]["median_ttft_ms"]
            / max(alone["B"]["median_ttft_ms"], 1e-9),
        })
    print(f"\n== fairness: --scheduling-policy {args.policy}, --max-num-seqs "
          f"{args.max_num_seqs}; backlogged: A {10 * args.max_num_seqs} streams vs B "
          f"{args.max_num_seqs}; latency: B {args.b_rate} req/s open loop, alone and under A's "
          f"flood; {args.max_tokens} tokens each, {args.seconds:.0f} s measured per phase")
    print(f"{'A:B':<6} {'A tok/s':>8} {'B tok/s':>8} {'B/A':>6} {'want':>6} {'err':>6} "
          f"{'B TTFT alone':>13} {'B TTFT flood':>13} {'ratio':>6}")
    for r in results:
        print(f"{r['weights']:<6} {r['a_together']['tokens_per_s']:>8.1f} "
              f"{r['b_together']['tokens_per_s']:>8.1f} {r['b_to_a_tokens']:>6.2f} "
              f"{r['expected_b_to_a']:>6.2f} {100 * r['share_error']:>5.1f}% "
              f"{r['b_alone']['median_ttft_ms']:>11.0f}ms "
              f"{r['b_under_flood']['median_ttft_ms']:>11.0f}ms {r['b_ttft_vs_alone']:>6.2f}")
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
