"""Offline throughput of `LLM.generate` against `tpserve bench throughput` on the same workload
and machine: N requests of I random prompt token ids (seeded, drawn from [1000, 20000) as the CLI
draws them), greedy, end-of-sequence ignored, so each generates exactly O tokens; all submitted at
once. Both time from the first submission to the last finished sequence (start-up excluded). The
two runs alternate `--repeats` times (CLI first); prints every figure with the 1-minute load
average before it, and the ratio of the medians. The CLI starts a new engine for each run; the
binding reuses one engine across runs, as a program calling `generate` repeatedly does, unless
`--fresh-engine` (then a new `LLM` per run, its start-up not timed either). A benchmark, not a
test: it asserts nothing.

    python python/benchmarks/throughput.py --model M --tpserve target/release/tpserve [--fresh-engine]
"""

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import tempfile
import time

from tpserve import LLM, SamplingParams


def cli_run(args):
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        subprocess.run(
            [args.tpserve, "bench", "throughput", "--model", args.model,
             "--max-model-len", str(args.max_model_len), "--num-prompts", str(args.num_prompts),
             "--input-len", str(args.input_len), "--output-len", str(args.output_len),
             "--result-json", result],
            check=True, env={**os.environ, "RUST_LOG": "warn", "TPSERVE_PROGRESS": "off"},
            stdout=subprocess.DEVNULL,
        )
        with open(result) as f:
            return json.load(f)["output_tokens_per_second"]


def python_run(llm, args, prompts):
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == args.num_prompts * args.output_len
    return generated / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tpserve", required=True, help="the release `tpserve` binary")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fresh-engine", action="store_true",
                        help="a new LLM for each run (as the CLI starts one), not one for all runs")
    args = parser.parse_args()
    rng = random.Random(0)
    cli, py = [], []

    def engine():
        return LLM(args.model, max_model_len=args.max_model_len)

    with (contextlib.nullcontext() if args.fresh_engine else engine()) as shared:
        for i in range(args.repeats):
            # Fresh prompts each run: a shared engine lives across runs, and repeated prompts
            # would hit its prefix cache (the CLI starts a new engine each run).
            prompts = [[rng.randrange(1000, 20000) for _ in range(args.input_len)]
                       for _ in range(args.num_prompts)]
            load_cli = os.getloadavg()[0]
            cli.append(cli_run(args))
            with (engine() if shared is None else contextlib.nullcontext(shared)) as llm:
                load_py = os.getloadavg()[0]
                py.append(python_run(llm, args, prompts))
            print(f"run {i + 1}: tpserve bench throughput {cli[-1]:.1f} output tok/s "
                  f"(load {load_cli:.2f}), LLM.generate {py[-1]:.1f} output tok/s "
                  f"(load {load_py:.2f})", flush=True)
    c, p = statistics.median(cli), statistics.median(py)
    print(f"median: tpserve bench throughput {c:.1f}, LLM.generate {p:.1f} output tok/s; "
          f"LLM.generate / CLI = {p / c:.3f}")


if __name__ == "__main__":
    main()
