#!/usr/bin/env python3
"""Turns the raw results of tests/gpu/bench.sh into the issue's figures: ratios to the machine's
floors measured in the same run, a table, and one JSON file.

What: reads WORK/bench_device.json (floors: copy bandwidth and cuBLAS GEMM rate, and the model's
byte and parameter counts, from the in-process benchmark), WORK/serve_*.json (`tpserve bench
serve --result-json`, vLLM's keys) and WORK/cold_start.json, and writes OUT_JSON with:
  decode_bs1_floor_ratio    weight bytes per token / copy bandwidth, over the median inter-token
                            latency a streaming client sees (128-token prompt, 256 tokens)
  tp2_decode_speedup        single-stream tok/s at TP=2 over TP=1 (only when TP=2 ran)
  prefill_2048_floor_ratio  2 x params x 2,048 / GEMM rate, over the median time to first token
  prefill_8192_floor_ratio  the same for 8,192 tokens, causal attention FLOPs added to the floor
  serve_1024_128_floor_ratio  compute floor of the whole workload (2 x params x all tokens +
                            attention) / its wall time, 1,000 prompts, concurrency 256
  cold_start_s              {"first": .., "warm": ..}: process start to /health 200
  lora_over_base            output tok/s over 8 LoRA adapters (rank 16, all seven projections)
                            over the base model's, 128 in / 256 out at concurrency 64, same server
  lora_first_load_s         seconds of each adapter's first request (preloaded from disk beside the
                            steps, then copied to a slot)
  lora_cycle                1,000 registered adapters through 16 slots (lora_cycle.py): requests
                            completed and failed, preloads, step-thread disk reads, slot loads and
                            their mean seconds
plus the raw figures (tok/s, TTFT, TPOT, ITL, floors, GPU, date, commit) and the decode-heavy
runs (128 in / 512 out at concurrency 1, 16, 64, 256).

"params" are the linear layers' weights (the embedding is a lookup); the lm_head counts once per
request (one sampled row per prefill), as in worker/examples/bench_device.rs.

How: bench_report.py WORK OUT_JSON [--tp2-work WORK2]
"""

import argparse
import json
import os
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def attention_flops(model, query_positions):
    """Causal attention FLOPs of the given (query count, context of the last query) prefills:
    QK^T and PV, 2 FLOPs per multiply-add, over every layer and query head."""
    per_pair = 4 * model["num_layers"] * model["q_heads"] * model["head_dim"]
    return per_pair * query_positions


def prefill_pairs(tokens):
    # Query i (0-based) sees i + 1 keys.
    return tokens * (tokens + 1) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work")
    ap.add_argument("out_json")
    ap.add_argument("--tp2-work", help="WORK of a TP=2 run on the same machine")
    args = ap.parse_args()
    w = args.work
    dev = load(os.path.join(w, "bench_device.json"))
    copy_bps = dev["copy_gb_per_s"] * 1e9
    gemm_fps = dev["gemm_tflops"] * 1e12
    model = dev["model"]
    layer_params = model["layer_params"]
    head_params = model["lm_head_params"]
    decode_bytes = dev["decode_bytes"]
    result = {
        "gpu": dev.get("gpu", ""),
        "date": os.environ.get("BENCH_DATE", ""),
        "commit": os.environ.get("BENCH_COMMIT", ""),
        "tensor_parallel_size": 1,
        "quantization": dev.get("quantization", ""),
        "kv_cache_dtype": dev.get("kv_cache_dtype", ""),
        "floors": {
            "copy_gb_per_s": dev["copy_gb_per_s"],
            "gemm_tflops": dev["gemm_tflops"],
            "decode_bytes_per_token": decode_bytes,
            "decode_floor_ms": decode_bytes / copy_bps * 1e3,
        },
        "in_process": {
            k: dev[k]
            for k in (
                "decode_ms_median",
                "decode_graph_ms_median",
                "decode_ratio_to_floor",
                "decode_graph_ratio_to_floor",
                "prefill_ms",
                "prefill_ratio_to_floor",
                "cuda_graphs",
                "graph_capture_seconds",
            )
            if k in dev
        },
        "phases": dev.get("phases", []),
    }
    rows = []

    def serve(name):
        path = os.path.join(w, f"serve_{name}.json")
        return load(path) if os.path.exists(path) else None

    single = serve("decode_c1_128_256")
    if single:
        itl = single["median_itl_ms"] / 1e3
        floor = decode_bytes / copy_bps
        result["decode_bs1_floor_ratio"] = floor / itl
        result["decode_bs1"] = {
            "median_itl_ms": single["median_itl_ms"],
            "p99_itl_ms": single["p99_itl_ms"],
            "tokens_per_s": 1.0 / itl,
            "floor_ms": floor * 1e3,
        }
        rows.append(("decode_bs1_floor_ratio", f"{floor / itl:.3f}",
                     f"median ITL {single['median_itl_ms']:.2f} ms vs floor {floor * 1e3:.2f} ms"))
    for tokens in (2048, 8192):
        r = serve(f"prefill_{tokens}")
        if not r:
            continue
        ttft = r["median_ttft_ms"] / 1e3
        flops = 2 * layer_params * tokens + 2 * head_params
        key = f"prefill_{tokens}_floor_ratio"
        if tokens == 8192:
            flops += attention_flops(model, prefill_pairs(tokens))
        floor = flops / gemm_fps
        result[key] = floor / ttft
        result[f"prefill_{tokens}"] = {
            "median_ttft_ms": r["median_ttft_ms"],
            "floor_ms": floor * 1e3,
            "tflop": flops / 1e12,
        }
        rows.append((key, f"{floor / ttft:.3f}",
                     f"median TTFT {r['median_ttft_ms']:.1f} ms vs floor {floor * 1e3:.1f} ms"))
    r = serve("throughput_1024_128")
    if r:
        n = r["completed"]
        inp = r["total_input_tokens"]
        out = r["total_output_tokens"]
        per_in = inp / max(n, 1)
        per_out = out / max(n, 1)
        # Each request: a prefill of its prompt, then one query per generated token but the
        # last (whose token is sampled, never computed), at growing contexts.
        decode_pairs = sum(per_in + i for i in range(1, int(per_out)))
        pairs = n * (prefill_pairs(per_in) + decode_pairs)
        computed = inp + out - n
        flops = 2 * layer_params * computed + 2 * head_params * out + attention_flops(model, pairs)
        floor = flops / gemm_fps
        result["serve_1024_128_floor_ratio"] = floor / r["duration"]
        result["serve_1024_128"] = {
            k: r[k]
            for k in ("completed", "failed", "duration", "output_throughput",
                      "total_token_throughput", "median_ttft_ms", "median_tpot_ms",
                      "median_itl_ms", "p99_itl_ms", "max_concurrency")
        }
        result["serve_1024_128"]["floor_s"] = floor
        rows.append(("serve_1024_128_floor_ratio", f"{floor / r['duration']:.3f}",
                     f"{r['output_throughput']:.0f} out tok/s, {r['total_token_throughput']:.0f} "
                     f"total tok/s, {r['duration']:.1f} s vs floor {floor:.1f} s"))
    heavy = {}
    for c in (1, 16, 64, 256):
        r = serve(f"decode_c{c}_128_512")
        if r:
            heavy[str(c)] = {
                k: r[k]
                for k in ("output_throughput", "median_tpot_ms", "median_itl_ms", "p99_itl_ms",
                          "median_ttft_ms", "completed", "failed")
            }
            rows.append((f"decode 128/512 c={c}", f"{r['output_throughput']:.0f} tok/s",
                         f"ITL p50 {r['median_itl_ms']:.2f} / p99 {r['p99_itl_ms']:.2f} ms"))
    result["decode_128_512"] = heavy
    base, lora = serve("base_c64_128_256"), serve("lora8_c64_128_256")
    if base and lora:
        keys = ("output_throughput", "median_tpot_ms", "median_itl_ms", "p99_itl_ms",
                "median_ttft_ms", "completed", "failed")
        result["lora_over_base"] = lora["output_throughput"] / base["output_throughput"]
        result["lora_c64_128_256"] = {"base": {k: base[k] for k in keys},
                                      "lora8": {k: lora[k] for k in keys}}
        first = os.path.join(w, "lora_first_load.json")
        if os.path.exists(first):
            loads = load(first)
            result["lora_first_load_s"] = loads
            rows.append(("lora_first_load_s", f"{max(loads.values()):.2f}",
                         "slowest first request of an adapter (disk -> host -> GPU slot)"))
        rows.append(("lora_over_base", f"{result['lora_over_base']:.3f}",
                     f"{lora['output_throughput']:.0f} vs {base['output_throughput']:.0f} out tok/s "
                     f"(8 adapters r16 vs base, c=64); TPOT p50 {lora['median_tpot_ms']:.2f} vs "
                     f"{base['median_tpot_ms']:.2f} ms"))
    cycle_path = os.path.join(w, "lora_cycle.json")
    if os.path.exists(cycle_path):
        cycle = load(cycle_path)
        result["lora_cycle"] = cycle
        rows.append(("lora_cycle", f"{cycle['completed']}/{cycle['requests']} completed",
                     f"{cycle['adapters']} adapters, 16 slots: {cycle['preloads']:.0f} preloads "
                     f"({cycle['preload_s_mean'] * 1e3:.0f} ms mean), "
                     f"{cycle['disk_loads']:.0f} step-thread reads, {cycle['slot_loads']:.0f} "
                     f"slot loads ({cycle['slot_load_s_mean'] * 1e3:.1f} ms mean), "
                     f"{cycle['failed']} failed"))
    cold_path = os.path.join(w, "cold_start.json")
    if os.path.exists(cold_path):
        cold = load(cold_path)
        result["cold_start_s"] = cold
        rows.append(("cold_start_s", f"{cold.get('first', float('nan')):.1f} / "
                     f"{cold.get('warm', float('nan')):.1f}", "first / warm start to /health 200"))
    if args.tp2_work:
        tp2 = os.path.join(args.tp2_work, "serve_decode_c1_128_256.json")
        if single and os.path.exists(tp2):
            itl2 = load(tp2)["median_itl_ms"]
            result["tp2_decode_speedup"] = single["median_itl_ms"] / itl2
            rows.append(("tp2_decode_speedup", f"{result['tp2_decode_speedup']:.2f}",
                         f"median ITL {itl2:.2f} ms at TP=2"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n== tpserve GPU benchmark ({result['gpu']}, {result['date']}, {result['commit']})")
    print(f"floors: copy {dev['copy_gb_per_s']:.0f} GB/s, GEMM {dev['gemm_tflops']:.0f} TFLOP/s")
    for key, value, note in rows:
        print(f"{key:<28} {value:<12} {note}")
    print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
