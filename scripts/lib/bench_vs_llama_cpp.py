"""tpserve against llama.cpp on one GGUF, side by side in one run (see bench-vs-llama-cpp.sh).

Phases, one after the other so they never share the cores:
  1. llama.cpp single-stream decode in-process (llama-cpp-python's generate loop, greedy,
     end-of-sequence ignored): 32 prompt tokens, 128 generated, three runs, the median;
  2. `tpserve bench decode` with the same lengths (whole engine: coordinator, gRPC, worker);
  3. `tpserve serve` + `tpserve bench serve` at 8 concurrent streams;
  4. llama.cpp's server (`python -m llama_cpp.server`) + the same `tpserve bench serve`.
Decode tokens/s counts the tokens after the first over the time after the first, in both.
The load average is recorded around every phase: other work on the machine skews the figures.
"""

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone

PROMPT = (
    "The history of the city begins with a small settlement on the river, where traders from "
    "the north met farmers from the south. Over the centuries the town grew into a market, then "
    "a port, and finally the capital of a kingdom whose rulers built walls, bridges and churches."
)


def load():
    return round(os.getloadavg()[0], 2)


def llama_cpp_decode(model, threads, prompt_len, output_len, runs):
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                verbose=False)
    tokens = llm.tokenize(PROMPT.encode())[:prompt_len]
    rates, ttfts = [], []
    for _ in range(runs):
        llm.reset()
        start = time.perf_counter()
        first = None
        n = 0
        for _tok in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            n += 1
            if first is None:
                first = time.perf_counter()
            if n == output_len:
                break
        end = time.perf_counter()
        rates.append((n - 1) / (end - first))
        ttfts.append((first - start) * 1000)
    return {"decode_tokens_per_s": statistics.median(rates), "ttft_ms": statistics.median(ttfts),
            "runs": rates}


def wait_healthy(url, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_serve(tpserve, base, args, out, extra=()):
    cmd = [tpserve, "bench", "serve", "--base-url", base, "--model", "smollm2",
           "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
           "--random-input-len", str(args.serve_input_len),
           "--random-output-len", str(args.serve_output_len), "--seed", str(args.seed),
           "--result-json", out, *extra]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    with open(out) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repo", required=True)
    p.add_argument("--model")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--serve-input-len", type=int, default=128)
    p.add_argument("--serve-output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--port", type=int, default=8391)
    p.add_argument("--result-json", default="bench-vs-llama-cpp.json")
    args = p.parse_args()
    repo = args.repo
    model = args.model or subprocess.run([f"{repo}/scripts/fetch-default-model.sh"], check=True,
                                         capture_output=True, text=True).stdout.strip()
    target = os.environ.get("CARGO_TARGET_DIR", f"{repo}/target")
    tpserve = f"{target}/release/tpserve"
    # The per-phase results of the tools it runs, read back and left behind in no checkout.
    tmp = tempfile.mkdtemp(prefix="bench-vs-llama-cpp-")
    atexit.register(shutil.rmtree, tmp, True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": model,
              "threads": args.threads, "cpu": cpu_name(), "loadavg": {}}

    print("llama.cpp decode ...", file=sys.stderr)
    result["loadavg"]["llama_cpp_decode_before"] = load()
    result["llama_cpp_decode"] = llama_cpp_decode(model, args.threads, args.prompt_len,
                                                  args.output_len, args.runs)

    print("tpserve decode ...", file=sys.stderr)
    result["loadavg"]["tpserve_decode_before"] = load()
    out = f"{tmp}/.tpserve-decode.json"
    subprocess.run([tpserve, "bench", "decode", "--model", model, "--max-model-len", "1024",
                    "--worker-threads", str(args.threads), "--result-json", out],
                   check=True, stdout=sys.stderr)
    with open(out) as f:
        result["tpserve_decode"] = json.load(f)

    base = f"http://127.0.0.1:{args.port}"
    print(f"tpserve serve, {args.concurrency} streams ...", file=sys.stderr)
    result["loadavg"]["tpserve_serve_before"] = load()
    server = subprocess.Popen([tpserve, "serve", "--model", model, "--served-model-name",
                               "smollm2", "--host", "127.0.0.1", "--port", str(args.port),
                               "--max-model-len", "2048", "--worker-threads",
                               str(args.threads)], stdout=sys.stderr, stderr=sys.stderr)
    try:
        wait_healthy(f"{base}/health", server)
        result["tpserve_serve"] = bench_serve(tpserve, base, args, f"{tmp}/.tpserve-serve.json")
    finally:
        stop(server)

    print(f"llama.cpp server, {args.concurrency} streams ...", file=sys.stderr)
    result["loadavg"]["llama_cpp_serve_before"] = load()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", model,
                               "--model_alias", "smollm2", "--host", "127.0.0.1", "--port",
                               str(args.port), "--n_threads", str(args.threads),
                               "--n_threads_batch", str(args.threads), "--n_ctx", "2048",
                               # By default a new request cuts off the one being streamed.
                               "--interrupt_requests", "False"],
                              stdout=sys.stderr, stderr=sys.stderr)
    try:
        wait_healthy(f"{base}/v1/models", server)
        # llama.cpp's server ignores `ignore_eos`: ban SmolLM2's end tokens (<|endoftext|>,
        # <|im_start|>, <|im_end|>) so that it, too, generates every requested token.
        no_eos = ["--extra-body", json.dumps({"logit_bias": {"0": -100, "1": -100, "2": -100}})]
        result["llama_cpp_serve"] = bench_serve(tpserve, base, args,
                                                f"{tmp}/.llama-cpp-serve.json", no_eos)
    finally:
        stop(server)
    result["loadavg"]["end"] = load()

    for k in ("tpserve_serve", "llama_cpp_serve"):
        r = result[k]
        want = args.num_prompts * args.serve_output_len
        if r["failed"] or r["total_output_tokens"] != want:
            print(f"warning: {k}: {r['failed']} failed, {r['total_output_tokens']} output tokens "
                  f"(asked for {want})", file=sys.stderr)
    d_ours = result["tpserve_decode"]["decode_tokens_per_s"]
    d_ref = result["llama_cpp_decode"]["decode_tokens_per_s"]
    s_ours = result["tpserve_serve"]["output_throughput"]
    s_ref = result["llama_cpp_serve"]["output_throughput"]
    result["ratios"] = {"single_stream_decode": d_ours / d_ref, "serve_output": s_ours / s_ref}
    with open(args.result_json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{os.path.basename(model)}, {args.threads} threads, {result['cpu']}, {result['date']}")
    print("| measure | tpserve | llama.cpp | tpserve / llama.cpp |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| single-stream decode tok/s ({args.prompt_len} in, {args.output_len} out) "
          f"| {d_ours:.1f} | {d_ref:.1f} | {d_ours / d_ref:.2f}x |")
    print(f"| {args.concurrency}-stream serving output tok/s ({args.num_prompts} requests, "
          f"{args.serve_input_len} in, {args.serve_output_len} out) "
          f"| {s_ours:.1f} | {s_ref:.1f} | {s_ours / s_ref:.2f}x |")
    print(f"load average before each phase: {result['loadavg']}")
    print(f"wrote {args.result_json}")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
