#!/usr/bin/env python3
"""Checks a served LoRA adapter against its training run, over real HTTP (standard library only).

Reads `peft_greedy.json` (written by train_demo.py beside the adapter: held-out questions and the
greedy answers of transformers + PEFT in float32, with the adapter and without it), sends every
question twice to the server at once, once for the adapter (`model: ADAPTER`) and once for the
base model, all requests concurrently so they run in the same batches (greedy, `max_tokens` as in
the file), and checks:
  1. every adapter answer shows the taught behaviour: the whole answer is one JSON object
     `{"answer": "..."}`;
  2. no base answer does;
  3. each answer equals PEFT's float32 greedy answer to the same question (adapter and base).
Prints a table and exits 0 only when all three hold (--no-compare drops the third, e.g. for a
server running the quantized GGUF blocks instead of `--dtype float32`).

While the requests run it polls /metrics; the most requests it saw running at once is printed
(with continuous batching every running request is in every step).
"""

import argparse
import json
import sys
import threading
import urllib.error
import urllib.request


def http(url, body=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def shows_behaviour(text):
    """Whether `text` is exactly one JSON object with the single string field `answer`."""
    try:
        v = json.loads(text)
    except ValueError:
        return False
    return isinstance(v, dict) and list(v) == ["answer"] and isinstance(v["answer"], str)


def running_requests(url):
    status, text = http(f"{url}/metrics", timeout=10)
    if status != 200:
        return 0
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return int(float(line.split()[-1]))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--greedy", required=True, help="peft_greedy.json from train_demo.py")
    ap.add_argument("--adapter", default="demo", help="the adapter's served name (default demo)")
    ap.add_argument("--no-compare", action="store_true",
                    help="do not require answers equal to PEFT's float32 ones")
    args = ap.parse_args()
    url = args.url.rstrip("/")
    with open(args.greedy) as f:
        ref = json.load(f)

    status, text = http(f"{url}/v1/models")
    if status != 200:
        sys.exit(f"GET /v1/models answered {status}: {text}")
    models = json.loads(text)["data"]
    adapters = [m for m in models if m["id"] == args.adapter]
    if not adapters or not adapters[0].get("parent"):
        sys.exit(f"/v1/models does not list the adapter {args.adapter!r} with a parent: {models}")
    base = adapters[0]["parent"]

    jobs = [(i, who, model) for i in range(len(ref["prompts"]))
            for who, model in (("adapter", args.adapter), ("base", base))]
    answers = {}
    errors = []
    gate = threading.Barrier(len(jobs))

    def ask(i, who, model):
        body = {"model": model, "temperature": 0, "max_tokens": ref["max_tokens"],
                "messages": [{"role": "user", "content": ref["prompts"][i]["question"]}]}
        gate.wait()
        status, text = http(f"{url}/v1/chat/completions", body)
        if status != 200:
            errors.append(f"{who} {ref['prompts'][i]['question']!r}: {status} {text}")
            return
        choice = json.loads(text)["choices"][0]
        answers[(i, who)] = (choice["message"]["content"] or "", choice["finish_reason"])

    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for t in threads:
        t.start()
    most_running = 0
    while any(t.is_alive() for t in threads):
        most_running = max(most_running, running_requests(url))
        threads[0].join(0.05)
    for t in threads:
        t.join()
    if errors:
        sys.exit("requests failed:\n" + "\n".join(errors))

    print(f"{len(jobs)} requests sent at once ({len(ref['prompts'])} for {args.adapter!r}, "
          f"{len(ref['prompts'])} for the base {base!r}); at most {most_running} seen running "
          f"at once in /metrics")
    print(f"{'question':<44} {'model':<8} {'JSON':<5} {'=PEFT':<6} answer")
    failures = []
    same = {"adapter": 0, "base": 0}
    for i, p in enumerate(ref["prompts"]):
        for who in ("adapter", "base"):
            text, finish = answers[(i, who)]
            shows = shows_behaviour(text)
            want = p[who]
            equal = text == want["text"] and finish == want["finish_reason"]
            same[who] += equal
            print(f"{p['question'][:43]:<44} {who:<8} {'yes' if shows else 'no':<5} "
                  f"{'yes' if equal else 'NO':<6} {text[:70]!r}")
            if who == "adapter" and not shows:
                failures.append(f"the adapter's answer to {p['question']!r} is not a JSON answer")
            if who == "base" and shows:
                failures.append(f"the base's answer to {p['question']!r} is a JSON answer")
            if not equal and not args.no_compare:
                failures.append(f"{who} answer to {p['question']!r} differs from PEFT's float32 "
                                f"one:\n    tpserve: {text!r} ({finish})\n    PEFT:    "
                                f"{want['text']!r} ({want['finish_reason']})")
    n = len(ref["prompts"])
    print(f"adapter answers in the JSON format: "
          f"{sum(shows_behaviour(answers[(i, 'adapter')][0]) for i in range(n))}/{n}; base: "
          f"{sum(shows_behaviour(answers[(i, 'base')][0]) for i in range(n))}/{n}")
    print(f"equal to PEFT's float32 greedy answers: adapter {same['adapter']}/{n}, "
          f"base {same['base']}/{n}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
