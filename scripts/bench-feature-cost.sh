#!/usr/bin/env bash
# Does a plain request run as fast as before a set of features landed? Runs the same offline
# workload (`tpserve bench throughput`: random prompts, all submitted at once, greedy, end of
# sequence ignored, no logprobs, penalties, constraints or tools) with two builds, alternating
# A, B, A, B, ... so that drifting load on a shared machine falls on both alike, then prints a
# table of every run and each build's median, and writes it all as JSON.
#
#   scripts/bench-feature-cost.sh BASE_BIN_DIR HEAD_BIN_DIR [OUT_JSON]
#
# Each BIN_DIR holds `tpserve` and `tpserve-worker` (copy them out of a target directory first,
# so a build during the run cannot replace them). Environment: ROUNDS (pairs of runs, default
# 3), NUM_PROMPTS (64), INPUT_LEN (128), OUTPUT_LEN (64), MODEL (default: the default model,
# scripts/fetch-default-model.sh), ENGINE_ARGS (default below: the engine's sizes spelled out,
# so a default that changed between the builds does not differ, and `--dtype float32`, the f32
# path every build has; builds from before issue 12 cannot keep a GGUF quantized). Both builds
# get the same flags, so the older one must accept them all. Passing the same folder twice
# measures the noise. The system load average is recorded before each run: on a machine shared
# with builds, compare runs taken at similar load.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,18p' "$0" >&2; exit 2; }
base="$(cd "$1" && pwd)"
head="$(cd "$2" && pwd)"
out="${3:-feature-cost.json}"
for d in "$base" "$head"; do
  for b in tpserve tpserve-worker; do
    [ -x "$d/$b" ] || { echo "$d/$b is missing" >&2; exit 2; }
  done
done
model="${MODEL:-$(scripts/fetch-default-model.sh)}"
rounds="${ROUNDS:-3}"
engine_args="${ENGINE_ARGS:---dtype float32 --max-model-len 1024 --max-num-seqs 256 \
--max-num-batched-tokens 512 --block-size 16 --kv-cache-space 2}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

run() {
  local name="$1" dir="$2" round="$3"
  local load
  load="$(cut -d' ' -f1 /proc/loadavg)"
  # The CPU seconds (user + system) of the benchmark and its worker, which other load disturbs
  # less than throughput: the rusage of reaped children, read by a Python wrapper.
  # shellcheck disable=SC2086 # ENGINE_ARGS is a list of flags
  python3 -c 'import resource, subprocess, sys
r = subprocess.run(sys.argv[2:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(str(u.ru_utime + u.ru_stime))
sys.exit(r.returncode)' "$work/$name-$round.cpu" \
  "$dir/tpserve" bench throughput --model "$model" --progress off $engine_args \
    --num-prompts "${NUM_PROMPTS:-64}" --input-len "${INPUT_LEN:-128}" \
    --output-len "${OUTPUT_LEN:-64}" --prompt-seed 13 \
    --result-json "$work/$name-$round.json" >"$work/$name-$round.log" 2>&1 \
    || { cat "$work/$name-$round.log" >&2; exit 1; }
  echo "$name $round $load" >>"$work/runs.txt"
  echo "round $round: $name done (load average before: $load)" >&2
}

for r in $(seq "$rounds"); do
  run base "$base" "$r"
  run head "$head" "$r"
done

python3 - "$work" "$out" "$base" "$head" "$model" "$engine_args" <<'PY'
import datetime, json, os, platform, statistics, sys

work, out, base, head, model, engine_args = sys.argv[1:]
runs = []
for line in open(f"{work}/runs.txt"):
    name, rnd, load = line.split()
    r = json.load(open(f"{work}/{name}-{rnd}.json"))
    runs.append({"build": name, "round": int(rnd), "load_average_before": float(load),
                 "elapsed_s": r["elapsed_time"],
                 "cpu_s": float(open(f"{work}/{name}-{rnd}.cpu").read()),
                 "output_tokens_per_second": r["output_tokens_per_second"],
                 "total_tokens_per_second": r["tokens_per_second"],
                 "requests": r["num_requests"], "input_len": r["input_len"],
                 "output_len": r["output_len"]})
print(f"{'round':>5} {'build':>5} {'load':>5} {'elapsed s':>9} {'out tok/s':>9} "
      f"{'total tok/s':>11} {'CPU s':>7}")
for x in runs:
    print(f"{x['round']:>5} {x['build']:>5} {x['load_average_before']:>5.2f} "
          f"{x['elapsed_s']:>9.2f} {x['output_tokens_per_second']:>9.1f} "
          f"{x['total_tokens_per_second']:>11.1f} {x['cpu_s']:>7.1f}")
summary = {}
for b in ("base", "head"):
    tps = [x["output_tokens_per_second"] for x in runs if x["build"] == b]
    cpu = [x["cpu_s"] for x in runs if x["build"] == b]
    summary[b] = {"median_output_tok_s": statistics.median(tps), "min": min(tps),
                  "max": max(tps), "median_cpu_s": statistics.median(cpu)}
ratio = summary["head"]["median_output_tok_s"] / summary["base"]["median_output_tok_s"]
# Spread: the widest run-to-run range of one build, relative to its median.
noise = max((s["max"] - s["min"]) / s["median_output_tok_s"] for s in summary.values())
for b, s in summary.items():
    print(f"{b}: median {s['median_output_tok_s']:.1f} output tok/s "
          f"(range {s['min']:.1f}-{s['max']:.1f}), median {s['median_cpu_s']:.1f} CPU s")
cpu_ratio = summary["head"]["median_cpu_s"] / summary["base"]["median_cpu_s"]
print(f"head / base: {ratio:.3f} in output tok/s, {cpu_ratio:.3f} in CPU seconds; "
      f"widest within-build spread of tok/s: {noise:.1%}")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), platform.machine())
json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{cpu}, {os.cpu_count()} CPUs", "model": model,
           "base_bin_dir": base, "head_bin_dir": head, "engine_args": engine_args,
           "runs": runs, "summary": summary,
           "head_over_base": ratio, "head_over_base_cpu_s": cpu_ratio,
           "widest_within_build_spread": noise},
          open(out, "w"), indent=2)
print(f"wrote {out}")
PY
