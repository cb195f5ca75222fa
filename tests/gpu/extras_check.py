#!/usr/bin/env python3
"""Checks log probabilities and sampling controls on the GPU against the CPU backend (f32): the
same requests to a `tpserve serve --device cuda` and a `tpserve serve --device cpu` of one
checkpoint.

What: starts both servers (BIN_DIR/tpserve serve --model MODEL on free ports), sends each the
same greedy /v1/completions requests: (1) `logprobs` 5 with `prompt_logprobs` 5 and nothing else,
(2) the same with presence, frequency and repetition penalties, a `logit_bias` and `min_tokens`.
Compares, for every prompt position and the first generated position, the log probabilities of
the tokens both backends list, and counts the leading generated tokens that agree. Writes the
figures to --out as JSON. Exit status 0 when every request answered 200 with the asked shape and
every compared log probability is within --tolerance (bf16 against f32), 1 otherwise.

Why: issue 13 (items 1 and 2) on the CUDA backend: a step that asks for either runs its logits
through the worker's shared sampler code; this is its only check on a GPU.

How: extras_check.py --bin BIN_DIR --model DIR --out OUT.json [--tolerance 0.15] [--device cuda]
     [--tp 2] (the GPU server's --tensor-parallel-size; its ranks' sampler reads the summed logits)
"""

import argparse
import json
import sys

import server as srv

PROMPT = "The quick brown fox jumps over the lazy dog, and then the dog"


def requests() -> list:
    plain = {"model": "m", "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
             "logprobs": 5, "prompt_logprobs": 5}
    controlled = dict(plain, presence_penalty=0.5, frequency_penalty=0.7,
                      repetition_penalty=1.3, logit_bias={"100": 3.0}, min_tokens=12)
    return [("plain", plain), ("penalties", controlled)]


def run(bin_dir: str, model: str, device: str, log_path: str, tp: int = 1) -> dict:
    args = ["--model", model, "--device", device, "--max-model-len", "1024",
            "--served-model-name", "m", "--tensor-parallel-size", str(tp)]
    server, base, log = srv.start(bin_dir, args, log_path)
    answers = {}
    try:
        if srv.wait_healthy(server, base) is None:
            raise RuntimeError(f"the {device} server did not come up (see {log_path})")
        for name, body in requests():
            status, answer = srv.post(base + "/v1/completions", body)
            if status != 200:
                raise RuntimeError(f"{device} {name}: status {status}: {answer}")
            answers[name] = answer["choices"][0]
    finally:
        srv.stop(server, log)
    return answers


def max_difference(gpu: dict, cpu: dict) -> tuple:
    """Largest |difference| over the log probabilities both list, and how many were compared."""
    worst, count = 0.0, 0
    for g, c in zip(gpu["prompt_logprobs"], cpu["prompt_logprobs"]):
        if g is None or c is None:
            continue
        for token, entry in g.items():
            if token in c:
                worst = max(worst, abs(entry["logprob"] - c[token]["logprob"]))
                count += 1
    g0, c0 = gpu["logprobs"]["top_logprobs"][0], cpu["logprobs"]["top_logprobs"][0]
    for text, value in g0.items():
        if text in c0:
            worst = max(worst, abs(value - c0[text]))
            count += 1
    return worst, count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--device", default="cuda",
                    help="the device checked against the CPU (cpu only to test this script)")
    ap.add_argument("--tp", type=int, default=1, help="the checked server's tensor parallelism")
    args = ap.parse_args()
    try:
        gpu = run(args.bin, args.model, args.device, args.out + ".gpu.log", args.tp)
        cpu = run(args.bin, args.model, "cpu", args.out + ".cpu.log")
    except RuntimeError as e:
        print(f"extras_check: {e}", file=sys.stderr)
        return 1
    report, ok = {}, True
    for name, _ in requests():
        g, c = gpu[name], cpu[name]
        worst, count = max_difference(g, c)
        gt, ct = g["logprobs"]["tokens"], c["logprobs"]["tokens"]
        agree = next((i for i, (a, b) in enumerate(zip(gt, ct)) if a != b), min(len(gt), len(ct)))
        # OpenAI's legacy shape keys each position's top tokens by text, so ids with the same
        # text merge: a position may list fewer than 5; the CPU's answer has the same shape.
        gsizes = [len(t or {}) for t in g["logprobs"]["top_logprobs"]]
        csizes = [len(t or {}) for t in c["logprobs"]["top_logprobs"]]
        shaped = len(gt) == 12 and all(n >= 1 for n in gsizes) and (
            agree < len(gt) or gsizes == csizes)
        report[name] = {"max_abs_logprob_difference": worst, "compared": count,
                        "leading_tokens_equal": agree, "generated": len(gt),
                        "shape_ok": shaped, "finish_reason": g["finish_reason"]}
        ok = ok and shaped and count > 0 and worst <= args.tolerance
        print(f"extras_check {name}: gpu~cpu max |logprob diff| {worst:.4f} over {count} values "
              f"(limit {args.tolerance}); {agree}/{len(gt)} leading tokens equal; "
              f"shape {'ok' if shaped else 'WRONG'}")
    report["penalties_change_output"] = gpu["plain"]["text"] != gpu["penalties"]["text"]
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
