#!/usr/bin/env bash
# The GPU evidence for tpserve's CUDA backend, in one run on the GPU test machine; prints a short
# table last.
#
# What: on a random Llama checkpoint written here (make_checkpoint.py: 4 layers, hidden 1024, GQA
# 8/2 heads, llama3 rope scaling, vocab 32000, a byte tokenizer; prompts of 5, 64, 333 and 1500
# tokens), compares tpserve's logits of every prompt position with Hugging Face transformers'
# (hf_reference.py) at TP=1 bfloat16 (prefill on the tensor-core attention kernel, again on the
# CUDA-core one, and every position as a one-token decode step: replayed by a CUDA graph, by a
# padded graph with the GEMV kernel pinned, and eagerly), TP=1 float16 and TP=2 bfloat16 (TP=2 only
# with two GPUs); checks device sampling (seeded repeats, top-k/top-p/min-p sets), the device's
# logit processing and log probabilities against the reference row (the logits example's
# --extras-check: logprobs, logit_bias, bad_words, min_tokens, repetition_penalty, masks under every
# filter), a prompt step's decode rows against the same rows decoded alone (--mixed-check: 240
# rows, run on the tensor-core decode kernel in a launch of their own) and greedy decoding (32 tokens through the serving step path) against transformers
# (compare.py holds tpserve to "no worse than transformers in the same dtype", both measured against
# float32); serves the checkpoint over HTTP with `tpserve serve` at TP=1 (--device auto) and TP=2
# (serve_check.py), each with CUDA graphs and with --enforce-eager; sends the same 32 greedy
# requests together and alone with --batch-invariant (all must match) and without
# (invariance_check.py); compares log probabilities and sampling controls with the CPU backend
# (extras_check.py); checks structured outputs beside plain requests (structured_check.py);
# checks --quantization fp8 and --kv-cache-dtype fp8 against transformers emulating them (step_fp8,
# step_fp8_kv), and pre-quantized FP8
# checkpoints (compressed-tensors per-channel, AutoFP8 static; make_fp8_checkpoint.py) against
# transformers on their dequantized weights (step_fp8_checkpoint), and AWQ and GPTQ 4-bit
# checkpoints alike (step_int4_checkpoint); runs
# three random PEFT LoRA adapters against transformers + PEFT, prefill and decode, and mixed with
# the base in one batch against each alone (step_lora); compares /v1/embeddings (--task embed,
# last-token pooling) with transformers' AutoModel hidden states at TP=1 and TP=2 (embed_check.py);
# checks that the 8B shape with dummy weights serves at --gpu-memory-utilization 0.9 and is refused
# at start at 0.05; asks SmolLM2 (GGUF) the capital of France; runs the Llama-3-8B-shaped benchmark
# (bench_device, dummy weights, tests/gpu/llama3-8b-config.json).
#
# Why: the GPU machine has no network and no Rust toolchain (docs: /work/shared/GPU.md), so the
# binaries are built elsewhere and all checks run in one batch. Every step records a row even
# when it fails; nothing stops at the first failure.
#
# How (from anywhere; it runs in the repository root):
#   cargo build --release --bins --examples -p tpserve-coordinator -p tpserve-worker  # where Rust is
#   tests/gpu/run.sh                                                                  # on the GPU machine
# Environment:
#   BIN_DIR        pre-built binaries (default target/release): tpserve, examples/logits,
#                  examples/bench_device
#   WORK           work directory (default /tmp/tpserve-gpu; ~1.5 GB of logits go there)
#   SMOLLM2_GGUF   the SmolLM2 GGUF file for the Paris check (skipped when unset or missing)
#   OUT            when set, the small results (log, table, JSON) are copied there
#   PYTHON         interpreter with torch + transformers (default python3)
#   STEP_TIMEOUT   seconds per step (default 300); BENCH_TIMEOUT for the benchmark (default 600)
#   SKIP_BENCH=1   leaves the 8B benchmark out (when tests/gpu/bench.sh runs in the same session)
#   ONLY="lora serve:1"  only these steps (step_NAME, arguments after colons; after the
#                  environment and the checkpoint)
#   REF_DEVICE     torch device of the checkpoint and the reference (default cuda; cpu only to
#                  test this script on a machine without a GPU, with stub binaries)
# Exit status: 0 when no row is FAIL, 1 otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
HERE=tests/gpu
BIN_DIR="${BIN_DIR:-target/release}"
WORK="${WORK:-/tmp/tpserve-gpu}"
PYTHON="${PYTHON:-python3}"
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-600}"
SMOLLM2_GGUF="${SMOLLM2_GGUF:-}"
OUT="${OUT:-}"
REF_DEVICE="${REF_DEVICE:-cuda}"
case "$BIN_DIR" in
  /*) ;;
  *) BIN_DIR="$ROOT/$BIN_DIR" ;;
esac
# The examples live in $BIN_DIR/examples, not beside tpserve-worker: name the worker for them
# (tpserve's EngineArgs read TPSERVE_WORKER_BINARY) unless the caller already did.
if [ -z "${TPSERVE_WORKER_BINARY:-}" ] && [ -x "$BIN_DIR/tpserve-worker" ]; then
  export TPSERVE_WORKER_BINARY="$BIN_DIR/tpserve-worker"
fi

CKPT="$WORK/ckpt"          # the random checkpoint and prompts.json
REF="$WORK/ref"            # transformers' logits and greedy ids
REF_FP8="$WORK/ref_fp8"    # the same, emulating --quantization fp8 (hf_reference.py --fp8)
REF_FP8KV="$WORK/ref_fp8kv" # the same, emulating --kv-cache-dtype fp8 (--fp8-kv)
OURS="$WORK/ours"          # tpserve's logits and greedy ids
TSV="$WORK/results.tsv"    # the table: step<TAB>result<TAB>figures
JSONL="$WORK/compare.jsonl" # compare.py's detailed records
LOG="$WORK/run.log"
VOCAB=32000
NEW_TOKENS=32
NGPU=0

# record STEP RESULT FIGURES: one row of the final table.
record() {
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$TSV"
  echo "== $1: $2 ($3)"
}

# timed TIMEOUT CMD...: runs CMD under `timeout`, echoing it; sets SECS and RC (never fails).
SECS=0
RC=0
timed() {
  local limit=$1 start
  shift
  echo "+ $*" >&2
  start=$(date +%s.%N)
  RC=0
  timeout -k 10 "$limit" "$@" || RC=$?
  SECS=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
}

# why_failed: the figures of a failed command, from RC.
why_failed() {
  if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then
    echo "timed out after ${SECS}s"
  else
    echo "exit status $RC after ${SECS}s (see run.log)"
  fi
}

step_env() {
  local list
  # shellcheck disable=SC1091 # sourced from the repository root
  source deploy/gpu-env.sh || true
  export NCCL_NVLS_ENABLE=0
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(hostname)"
    nvidia-smi 2>&1 || true
    "$PYTHON" -c 'import torch, transformers as t; print("torch", torch.__version__,
      "cuda", torch.version.cuda, "transformers", t.__version__)' 2>&1 || true
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "CUDA_INCLUDE_DIR=${CUDA_INCLUDE_DIR:-}"
    echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
    echo "TPSERVE_WORKER_BINARY=${TPSERVE_WORKER_BINARY:-}"
    ls -l "$BIN_DIR/tpserve" "$BIN_DIR/tpserve-worker" "$BIN_DIR/examples/logits" \
      "$BIN_DIR/examples/bench_device" 2>&1 || true
  } >"$WORK/env.txt"
  cat "$WORK/env.txt"
  list=$(nvidia-smi -L 2>/dev/null || true)
  echo "$list"
  NGPU=$(grep -c '^GPU ' <<<"$list" || true)
  if [ "$NGPU" -ge 1 ] && [ -n "${CUDA_INCLUDE_DIR:-}" ]; then
    record "gpus" "PASS" "$NGPU x $(sed -n 's/^GPU 0: \(.*\) (UUID.*/\1/p' <<<"$list")"
  elif [ "$NGPU" -ge 1 ]; then
    record "gpus" "FAIL" "$NGPU GPU(s) but deploy/gpu-env.sh found no CUDA pip packages"
  else
    record "gpus" "FAIL" "nvidia-smi -L lists no GPU"
  fi
}

step_checkpoint() {
  rm -rf "$CKPT"
  timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/make_checkpoint.py" "$CKPT" --device "$REF_DEVICE"
  if [ "$RC" -eq 0 ] && [ -f "$CKPT/model.safetensors" ] && [ -f "$CKPT/prompts.json" ]; then
    record "checkpoint" "PASS" \
      "random Llama 4L/1024/GQA 8:2, llama3 rope; prompts 5/64/333/1500 (${SECS}s)"
  else
    record "checkpoint" "FAIL" "make_checkpoint.py: $(why_failed)"
  fi
}

step_reference() {
  if [ ! -f "$CKPT/prompts.json" ]; then
    record "hf reference" "SKIP" "needs the checkpoint"
    return
  fi
  rm -rf "$REF"
  timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/hf_reference.py" "$CKPT" "$REF" \
    --new-tokens "$NEW_TOKENS" --device "$REF_DEVICE"
  if [ "$RC" -eq 0 ] && [ -f "$REF/hf_float32.f32" ]; then
    record "hf reference" "PASS" "transformers eager, bf16/f16/f32 logits + greedy (${SECS}s)"
  else
    record "hf reference" "FAIL" "hf_reference.py: $(why_failed)"
  fi
}

# ours_logits TAG TP DTYPE: tpserve's logits (and greedy ids) into $OURS/TAG.{f32,json}.
ours_logits() {
  local tag=$1 tp=$2 dtype=$3 bin="$BIN_DIR/examples/logits" model="${OURS_MODEL:-$CKPT}"
  shift 3
  local extra=("$@")
  # A pre-quantized FP8 checkpoint runs in FP8 (as stored, no flag needed): the checks of
  # --quantization fp8 below.
  local fp8=""
  if grep -Eq '"quant_method": "(fp8|compressed-tensors)"' "$model/config.json" 2>/dev/null; then
    fp8=" --quantization fp8 "
  fi
  rm -f "$OURS/$tag.f32" "$OURS/$tag.json"
  if [ "$tp" -gt "$NGPU" ]; then
    record "logits $tag" "SKIP" "skipped: needs $tp GPUs, this machine has $NGPU"
    return
  fi
  if [ ! -f "$CKPT/prompts.json" ]; then
    record "logits $tag" "SKIP" "needs the checkpoint"
    return
  fi
  if [ ! -x "$bin" ]; then
    record "logits $tag" "FAIL" "no binary $bin"
    return
  fi
  local checks=(--sampling-check --extras-check --mixed-check)
  local sampled="device sampling, logit processing and mixed-step checks passed"
  case " ${extra[*]} $fp8" in
    *" --lora-adapter "*) sampled="the base model's sampling checks are not run with an adapter" ;;
    # The sampling check draws from 288 rows in one step and checks the draws against the sets
    # of a 5-token prompt's logits, and the mixed check compares 240 decode rows alone and beside
    # a prompt (368 rows). With FP8 weights, steps of up to 8 rows multiply unquantized
    # activations (the GEMV), larger ones activations rounded to FP8 with one scale per step's
    # product below 512 rows: so the rows of those steps differ by that rounding.
    *" --quantization fp8 "*)
      checks=(--extras-check)
      sampled="logit processing checks passed; no sampling or mixed-step check (FP8 logits depend on the step's rows)"
      ;;
  esac
  timed "$STEP_TIMEOUT" "$bin" --model "$model" --device cuda --dtype "$dtype" \
    --tensor-parallel-size "$tp" --prompts "$CKPT/prompts.json" --out "$OURS/$tag.f32" \
    --greedy "$NEW_TOKENS" --greedy-out "$OURS/$tag.json" "${checks[@]}" "${extra[@]}"
  if [ "$RC" -eq 0 ] && [ -s "$OURS/$tag.f32" ]; then
    record "logits $tag" "PASS" "ran in ${SECS}s (prefill of 4 prompts + $NEW_TOKENS greedy steps; $sampled)"
  else
    record "logits $tag" "FAIL" "$(why_failed)"
  fi
}

# step_bf16: the default path in bf16 (tensor-core prefill attention, graphs for decode) against
# transformers: prefill logits and greedy decoding. Needs step_reference first.
step_bf16() {
  ours_logits tp1-bf16 1 bfloat16
  check_logits tp1-bf16 bfloat16
  check_greedy tp1-bf16 bfloat16 0.1
}

# step_kernels: step_bf16's prompts on the other prefill kernels (needs step_bf16 first): the
# CUDA-core attention kernel (the default takes tensor cores for prefill chunks and CUDA cores for
# decode), attention_mma.cu instead of sm_90a's Hopper kernel, and the batch-invariant kernels
# (one tensor-core GEMM for every row count, unsplit CUDA-core attention) for prefill chunks and
# for every position as a decode step (bit-identical to their prefill).
step_kernels() {
  export TPSERVE_CUDA_ATTENTION=simt
  ours_logits tp1-bf16-simt 1 bfloat16
  unset TPSERVE_CUDA_ATTENTION
  check_logits tp1-bf16-simt bfloat16 tp1-bf16
  export TPSERVE_CUDA_ATTENTION=mma
  ours_logits tp1-bf16-mma 1 bfloat16
  unset TPSERVE_CUDA_ATTENTION
  check_logits tp1-bf16-mma bfloat16 tp1-bf16
  ours_logits tp1-bf16-invariant 1 bfloat16 --batch-invariant
  check_logits tp1-bf16-invariant bfloat16 tp1-bf16
  ours_logits tp1-bf16-invariant-decode 1 bfloat16 --batch-invariant --chunk 1
  check_logits tp1-bf16-invariant-decode bfloat16 tp1-bf16-invariant exact
}

# step_f16: the default path in f16 against transformers' f16 run.
step_f16() {
  ours_logits tp1-f16 1 float16
  check_logits tp1-f16 float16
  check_greedy tp1-f16 float16 0.03
}

# step_decode: every position as a one-token decode step (chunks of 1), against the prefill
# logits of step_bf16 (needs step_reference and step_bf16 first): replayed by the CUDA graph of
# batch size 1 (the decode kernel with its key splits sized on the device and their combine, at
# contexts up to 1,500), through a graph of 8 rows (7 of them padding) with the GEMV pinned,
# eagerly, with the GEMV's two depths (bit-identical), and on the tensor-core GEMV (also its
# 16-row instance, on prompts in chunks of 16).
step_decode() {
  ours_logits tp1-bf16-decode 1 bfloat16 --chunk 1
  check_logits tp1-bf16-decode bfloat16 tp1-bf16
  # The same through a graph of 8 rows (7 of them padding), with the GEMV kernel pinned for
  # every few-row product; and eagerly (no graphs).
  export TPSERVE_CUDA_LINEAR=gemv
  ours_logits tp1-bf16-decode-pad 1 bfloat16 --chunk 1 --graph-sizes 8
  unset TPSERVE_CUDA_LINEAR
  check_logits tp1-bf16-decode-pad bfloat16 tp1-bf16-decode
  ours_logits tp1-bf16-decode-eager 1 bfloat16 --chunk 1 --enforce-eager
  check_logits tp1-bf16-decode-eager bfloat16 tp1-bf16-decode
  # Every one-row product on the GEMV pinned to 2 chunks in flight per lane, then to its deep
  # variant (8 chunks): the same reduction order, so bit-identical.
  export TPSERVE_CUDA_LINEAR=gemv
  ours_logits tp1-bf16-decode-gemv 1 bfloat16 --chunk 1
  export TPSERVE_CUDA_LINEAR=gemv-deep
  ours_logits tp1-bf16-decode-deep 1 bfloat16 --chunk 1
  unset TPSERVE_CUDA_LINEAR
  check_logits tp1-bf16-decode-deep bfloat16 tp1-bf16-decode-gemv exact
  # Every few-row product on the tensor-core GEMV (other sums than the FMA GEMV's), and the
  # greedy batch of 4 rows through it, against transformers.
  # Then the prompts in chunks of 16 rows: products of 9 to 16 rows on its 16-row instance.
  export TPSERVE_CUDA_LINEAR=mma
  ours_logits tp1-bf16-decode-mma 1 bfloat16 --chunk 1
  ours_logits tp1-bf16-chunk16-mma 1 bfloat16 --chunk 16
  unset TPSERVE_CUDA_LINEAR
  check_logits tp1-bf16-decode-mma bfloat16 tp1-bf16-decode
  check_greedy tp1-bf16-decode-mma bfloat16 0.1
  check_logits tp1-bf16-chunk16-mma bfloat16 tp1-bf16
}

# step_fp8: `--quantization fp8` (issue 12) on the random checkpoint. Against transformers
# emulating it (hf_reference.py --fp8: the same FP8 weights; the inputs of products above 8 rows
# rounded to FP8 the same way; its bfloat16 run is the peer): prefill logits (one chunk per
# prompt, as the emulation quantizes a whole prompt's rows at once) and greedy decoding (through
# the FP8 GEMV). Against the unquantized float32 truth with the float32 emulation as the peer:
# no further from it than FP8 rounding explains. Skipped before compute capability 8.9.
step_fp8() {
  fp8_reference fp8 "$REF_FP8" "FP8 emulated, bf16/f32" --fp8 || return 0
  ours_logits tp1-fp8 1 bfloat16 --quantization fp8 --chunk 2048
  if [ ! -s "$OURS/tp1-fp8.f32" ]; then
    return
  fi
  run_compare "tp1-fp8 vs hf-fp8" --truth "$REF_FP8/hf_float32.f32" \
    --peer "$REF_FP8/hf_bfloat16.f32" --ours "$OURS/tp1-fp8.f32" --vocab "$VOCAB" \
    --prompts "$CKPT/prompts.json"
  check_fp8_truth tp1-fp8
  # Every position as a one-row decode step, and the greedy batch of 4 rows, with every FP8
  # product of up to 8 rows on the tensor-core GEMV (weight-only FP8, other sums than the FMA
  # GEMV's): against the unquantized float32 truth, no further from it than the FP8 emulation.
  export TPSERVE_CUDA_LINEAR=mma
  ours_logits tp1-fp8-mma 1 bfloat16 --quantization fp8 --chunk 1
  unset TPSERVE_CUDA_LINEAR
  [ -s "$OURS/tp1-fp8-mma.f32" ] && check_fp8_truth tp1-fp8-mma
}

# check_fp8_truth TAG: an --quantization fp8 run's logits against the unquantized float32 truth
# (step_reference's) with the FP8 emulation's float32 as the peer, and its greedy ids against the
# emulation's.
check_fp8_truth() {
  local tag=$1
  if [ -f "$REF/hf_float32.f32" ]; then
    run_compare "$tag vs hf (FP8 rounding as the peer)" --truth "$REF/hf_float32.f32" \
      --peer "$REF_FP8/hf_float32.f32" --ours "$OURS/$tag.f32" --vocab "$VOCAB" \
      --prompts "$CKPT/prompts.json"
  fi
  run_compare "greedy $tag" --greedy "$OURS/$tag.json" \
    --greedy-ref "$REF_FP8/hf_greedy_bfloat16.json" \
    --greedy-truth "$REF_FP8/hf_greedy_float32.json" --ref-label "fp8 bfloat16" --near-tie 0.1
}

# step_fp8_kv: `--kv-cache-dtype fp8` (issue 12): keys and values stored in FP8 E4M3 (scales of
# 1: the random checkpoint has no k_scale / v_scale). Against transformers with the keys and
# values its attention reads rounded the same way (hf_reference.py --fp8-kv; its bfloat16 run is
# the peer): prefill logits (tensor-core attention: on sm_90a the Hopper kernel converting FP8
# tiles in shared memory, and with TPSERVE_CUDA_ATTENTION=mma attention_mma.cu's; the CUDA-core
# kernel), every position as a graph-replayed decode step (the decode kernel rounds its own key
# and value too), greedy decoding; TP=2 where there are two GPUs. Skipped before compute
# capability 8.9.
step_fp8_kv() {
  fp8_reference "fp8 kv" "$REF_FP8KV" "keys and values rounded to E4M3" --fp8-kv || return 0
  local tag
  ours_logits tp1-fp8kv 1 bfloat16 --kv-cache-dtype fp8 --chunk 2048
  export TPSERVE_CUDA_ATTENTION=simt
  ours_logits tp1-fp8kv-simt 1 bfloat16 --kv-cache-dtype fp8
  unset TPSERVE_CUDA_ATTENTION
  # The prompts on attention_mma.cu instead of sm_90a's Hopper kernel (elsewhere the same
  # kernel as tp1-fp8kv).
  export TPSERVE_CUDA_ATTENTION=mma
  ours_logits tp1-fp8kv-mma 1 bfloat16 --kv-cache-dtype fp8 --chunk 2048
  unset TPSERVE_CUDA_ATTENTION
  ours_logits tp1-fp8kv-decode 1 bfloat16 --kv-cache-dtype fp8 --chunk 1
  ours_logits tp2-fp8kv 2 bfloat16 --kv-cache-dtype fp8
  for tag in tp1-fp8kv tp1-fp8kv-simt tp1-fp8kv-mma tp1-fp8kv-decode tp2-fp8kv; do
    [ -s "$OURS/$tag.f32" ] || continue
    run_compare "$tag vs hf-fp8kv" --truth "$REF_FP8KV/hf_float32.f32" \
      --peer "$REF_FP8KV/hf_bfloat16.f32" --ours "$OURS/$tag.f32" --vocab "$VOCAB" \
      --prompts "$CKPT/prompts.json"
  done
  if [ -s "$OURS/tp1-fp8kv.f32" ] && [ -f "$REF/hf_float32.f32" ]; then
    run_compare "tp1-fp8kv vs hf (FP8 KV rounding as the peer)" --truth "$REF/hf_float32.f32" \
      --peer "$REF_FP8KV/hf_float32.f32" --ours "$OURS/tp1-fp8kv.f32" --vocab "$VOCAB" \
      --prompts "$CKPT/prompts.json"
  fi
  if [ -s "$OURS/tp1-fp8kv.json" ]; then
    run_compare "greedy tp1-fp8kv" --greedy "$OURS/tp1-fp8kv.json" \
      --greedy-ref "$REF_FP8KV/hf_greedy_bfloat16.json" \
      --greedy-truth "$REF_FP8KV/hf_greedy_float32.json" --ref-label "fp8 kv bfloat16" --near-tie 0.1
  fi
}

# step_fp8_checkpoint LAYOUT: a pre-quantized FP8 checkpoint (issue 12) made from the random
# checkpoint by make_fp8_checkpoint.py (channel: compressed-tensors FP8_DYNAMIC, per-channel
# weight scales; static: AutoFP8's per-tensor weight and static activation scales), its FP8 weights
# run as stored. Against transformers on its dequantized twin (the same weights in float32) with
# the inputs of products above 8 rows rounded as tpserve rounds them (hf_reference.py
# --fp8-inputs; its bfloat16 run is the peer): prefill logits (one chunk per prompt) and greedy
# decoding (through the FP8 GEMV with per-row scales). Skipped before compute capability 8.9.
step_fp8_checkpoint() {
  if ! fp8_capable; then
    record "fp8 checkpoint $1" "SKIP" "needs compute capability 8.9 or newer"
    return
  fi
  quantized_checkpoint fp8 "$1" --layout "dequantized, FP8 inputs" --fp8-inputs
}

# step_int4_checkpoint FORMAT: a 4-bit checkpoint (issue 12) made from the random checkpoint by
# make_int4_checkpoint.py (awq: AutoAWQ's GEMM packing, groups of 128 with zero points; gptq:
# AutoGPTQ's format, groups of 128, symmetric; gptq-act: the same in act-order, g_idx out of
# input order), its packed weights run as stored (the 4-bit GEMV for decoding, after gathering
# an act-order weight's inputs into its order; the 4-bit GEMM for 9 to 64 rows; dequantized for
# cuBLAS above). Against transformers on its dequantized twin (the same weights in float32; its
# bfloat16 run, which rounds them as our prefill does, is the peer): prefill logits (one chunk
# per prompt, and chunks of 24 and 64 rows: the 4-bit GEMM), greedy decoding and every position
# as a decode step (through the GEMV). The decode run fails unless every linear weight is held
# in 4 bits (act-order ones in act-order), none dequantized at load.
step_int4_checkpoint() {
  quantized_checkpoint int4 "$1" --format "dequantized" || return 0
  local held="groups of 128 inputs;"
  [ "$1" != gptq-act ] || held="act-order (inputs gathered by group);"
  # Every position as a one-row decode step: the 4-bit GEMV's logits against the same truth,
  # with the SiLU-mul in a kernel of its own and in the gate and up GEMV (TPSERVE_CUDA_GATED_W4),
  # and with the GEMVs computing their tiles in pairs (TPSERVE_CUDA_W4_PAIRS): the same bits.
  TPSERVE_CUDA_GATED_W4=0 OURS_MODEL="$QDIR" ours_logits "$QTAG-decode" 1 bfloat16 --chunk 1 \
    --require-weights "$held"
  TPSERVE_CUDA_GATED_W4=1 OURS_MODEL="$QDIR" ours_logits "$QTAG-decode-gated" 1 bfloat16 \
    --chunk 1
  TPSERVE_CUDA_W4_PAIRS=1 OURS_MODEL="$QDIR" ours_logits "$QTAG-decode-pairs" 1 bfloat16 \
    --chunk 1
  if [ -s "$OURS/$QTAG-decode.f32" ]; then
    run_compare "$QTAG-decode vs hf (dequantized)" --truth "$QREF/hf_float32.f32" \
      --peer "$QREF/hf_bfloat16.f32" --ours "$OURS/$QTAG-decode.f32" --vocab "$VOCAB" \
      --prompts "$CKPT/prompts.json"
    [ -s "$OURS/$QTAG-decode-gated.f32" ] &&
      run_compare "$QTAG-decode-gated vs hf (dequantized)" --truth "$QREF/hf_float32.f32" \
        --peer "$QREF/hf_bfloat16.f32" --ours "$OURS/$QTAG-decode-gated.f32" --vocab "$VOCAB" \
        --prompts "$CKPT/prompts.json" --vs "$OURS/$QTAG-decode.f32" --vs-label "$QTAG-decode" \
        --vs-exact
    [ -s "$OURS/$QTAG-decode-pairs.f32" ] &&
      run_compare "$QTAG-decode-pairs vs hf (dequantized)" --truth "$QREF/hf_float32.f32" \
        --peer "$QREF/hf_bfloat16.f32" --ours "$OURS/$QTAG-decode-pairs.f32" --vocab "$VOCAB" \
        --prompts "$CKPT/prompts.json" --vs "$OURS/$QTAG-decode.f32" --vs-label "$QTAG-decode" \
        --vs-exact
  fi
  # Prompts in chunks of 24 and 64 rows: the 4-bit GEMM (n16, n32 and n64 variants).
  local rows
  for rows in 24 64; do
    OURS_MODEL="$QDIR" ours_logits "$QTAG-gemm$rows" 1 bfloat16 --chunk "$rows"
    if [ -s "$OURS/$QTAG-gemm$rows.f32" ]; then
      run_compare "$QTAG-gemm$rows vs hf (dequantized)" --truth "$QREF/hf_float32.f32" \
        --peer "$QREF/hf_bfloat16.f32" --ours "$OURS/$QTAG-gemm$rows.f32" --vocab "$VOCAB" \
        --prompts "$CKPT/prompts.json"
    fi
  done
}

# quantized_checkpoint KIND VARIANT MAKER_FLAG VS [REFERENCE_ARGS...]: what the FP8 and 4-bit
# checkpoint steps share. make_KIND_checkpoint.py writes the checkpoint (MAKER_FLAG VARIANT)
# and its dequantized float32 twin; hf_reference.py runs transformers on the twin in bfloat16
# and float32 (with REFERENCE_ARGS); our prefill logits (one chunk per prompt) are compared
# with the twin's float32 run, its bfloat16 run as the peer (row "tp1-KIND-VARIANT vs hf (VS)"),
# and our greedy decoding with its. Leaves QDIR, QREF and QTAG for the caller's further checks;
# returns 1 when a stage before the comparisons failed (its FAIL row recorded).
quantized_checkpoint() {
  local kind=$1 variant=$2 flag=$3 vs=$4
  shift 4
  QDIR="$WORK/$kind-$variant" QREF="$WORK/ref_${kind}_$variant" QTAG="tp1-$kind-$variant"
  rm -rf "$QDIR" "$QREF"
  timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/make_${kind}_checkpoint.py" "$CKPT" "$QDIR" \
    "$flag" "$variant" --device "$REF_DEVICE"
  if [ "$RC" -ne 0 ] || [ ! -f "$QDIR/dequantized/model.safetensors" ]; then
    record "$kind checkpoint $variant" "FAIL" "make_${kind}_checkpoint.py: $(why_failed)"
    return 1
  fi
  timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/hf_reference.py" "$QDIR/dequantized" "$QREF" \
    --new-tokens "$NEW_TOKENS" --device "$REF_DEVICE" --dtypes bfloat16,float32 "$@"
  if [ "$RC" -ne 0 ] || [ ! -f "$QREF/hf_float32.f32" ]; then
    record "hf $kind $variant reference" "FAIL" "hf_reference.py $*: $(why_failed)"
    return 1
  fi
  record "$kind checkpoint $variant" "PASS" "made, and transformers on its dequantized twin (${SECS}s)"
  OURS_MODEL="$QDIR" ours_logits "$QTAG" 1 bfloat16 --chunk 2048
  if [ ! -s "$OURS/$QTAG.f32" ]; then
    return 1
  fi
  run_compare "$QTAG vs hf ($vs)" --truth "$QREF/hf_float32.f32" \
    --peer "$QREF/hf_bfloat16.f32" --ours "$OURS/$QTAG.f32" --vocab "$VOCAB" \
    --prompts "$CKPT/prompts.json"
  run_compare "greedy $QTAG" --greedy "$OURS/$QTAG.json" \
    --greedy-ref "$QREF/hf_greedy_bfloat16.json" \
    --greedy-truth "$QREF/hf_greedy_float32.json" --ref-label "$kind $variant bfloat16" \
    --near-tie 0.1
}

# fp8_reference LABEL DIR WHAT FLAG: what the FP8 steps start with: a SKIP row LABEL before
# compute capability 8.9; else transformers emulating it (hf_reference.py FLAG, bfloat16 and
# float32) into DIR, row "hf LABEL reference" (WHAT: what is emulated). Returns 1 unless the
# reference is there.
fp8_reference() {
  local label=$1 dir=$2 what=$3 flag=$4
  if ! fp8_capable; then
    record "$label" "SKIP" "needs compute capability 8.9 or newer"
    return 1
  fi
  rm -rf "$dir"
  timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/hf_reference.py" "$CKPT" "$dir" \
    --new-tokens "$NEW_TOKENS" --device "$REF_DEVICE" --dtypes bfloat16,float32 "$flag"
  if [ "$RC" -eq 0 ] && [ -f "$dir/hf_float32.f32" ]; then
    record "hf $label reference" "PASS" "transformers eager, $what (${SECS}s)"
    return 0
  fi
  record "hf $label reference" "FAIL" "hf_reference.py $flag: $(why_failed)"
  return 1
}

# fp8_capable: whether this GPU runs FP8 (compute capability 8.9 or newer).
fp8_capable() {
  local cc
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
  [ -n "$cc" ] && awk -v c="$cc" 'BEGIN { exit !(c >= 8.9) }'
}

# run_compare LABEL ARGS...: compare.py records its own row (exit 0 or 1); any other exit is a
# FAIL row here.
run_compare() {
  local label=$1
  shift
  RC=0
  "$PYTHON" "$HERE/compare.py" --label "$label" --tsv "$TSV" --jsonl "$JSONL" "$@" || RC=$?
  if [ "$RC" -ne 0 ] && [ "$RC" -ne 1 ]; then
    record "$label" "FAIL" "compare.py exit status $RC (see run.log)"
  fi
}

# check_logits TAG DTYPE [VS_TAG [exact]]: tpserve's logits of TAG against transformers' in
# DTYPE (and against VS_TAG's, bit for bit with "exact").
check_logits() {
  local tag=$1 dtype=$2 vs=${3:-} exact=${4:-} extra=()
  if [ ! -s "$OURS/$tag.f32" ] || [ ! -f "$REF/hf_$dtype.f32" ]; then
    record "$tag vs hf" "SKIP" "no logits (see the rows above)"
    return
  fi
  if [ -n "$vs" ] && [ -s "$OURS/$vs.f32" ]; then
    extra=(--vs "$OURS/$vs.f32" --vs-label "$vs")
    [ "$exact" = exact ] && extra+=(--vs-exact)
  fi
  run_compare "$tag vs hf" --truth "$REF/hf_float32.f32" --peer "$REF/hf_$dtype.f32" \
    --ours "$OURS/$tag.f32" --vocab "$VOCAB" --prompts "$CKPT/prompts.json" "${extra[@]}"
}

# check_greedy TAG DTYPE NEAR_TIE: tpserve's greedy ids against transformers' in DTYPE and f32.
check_greedy() {
  local tag=$1 dtype=$2 near=$3
  if [ ! -s "$OURS/$tag.json" ] || [ ! -f "$REF/hf_greedy_$dtype.json" ]; then
    record "greedy $tag" "SKIP" "no greedy ids (see the rows above)"
    return
  fi
  run_compare "greedy $tag" --greedy "$OURS/$tag.json" --greedy-ref "$REF/hf_greedy_$dtype.json" \
    --greedy-truth "$REF/hf_greedy_float32.json" --ref-label "$dtype" --near-tie "$near"
}

# step_tp2: TP=2 sums its partial products with the one-shot all-reduce over peer memory (the
# two ranks are threads of one process here, so by peer access; `tpserve serve` maps them by CUDA
# IPC): prefill chunks, and every position as a graph-replayed decode step. With two ranks a sum
# is one rounding, so NCCL (--disable-custom-all-reduce) must agree bit for bit. Needs
# step_bf16's and step_decode's TP=1 logits.
step_tp2() {
  ours_logits tp2-bf16 2 bfloat16
  ours_logits tp2-bf16-decode 2 bfloat16 --chunk 1
  ours_logits tp2-bf16-nccl 2 bfloat16 --disable-custom-all-reduce
  if [ "$NGPU" -ge 2 ]; then
    check_logits tp2-bf16 bfloat16 tp1-bf16
    check_greedy tp2-bf16 bfloat16 0.1
    check_logits tp2-bf16-decode bfloat16 tp1-bf16-decode
    check_logits tp2-bf16-nccl bfloat16 tp2-bf16 exact
  fi
}

# step_serve TP [eager]: `tpserve serve` with TP worker processes on the random checkpoint, 8
# concurrent HTTP completions (serve_check.py), decode through CUDA graphs (the default) or, with
# "eager", --enforce-eager; the texts are compared with TP=1's graph run.
step_serve() {
  local tp=$1 mode=${2:-graphs} name out same extra=()
  name="serve tp$tp"
  out="$WORK/serve_tp$tp.json"
  if [ "$mode" = eager ]; then
    name="serve tp$tp eager"
    out="$WORK/serve_tp${tp}_eager.json"
    extra=(--serve-arg=--enforce-eager)
  fi
  rm -f "$out"
  if [ "$tp" -gt "$NGPU" ]; then
    record "$name" "SKIP" "skipped: needs $tp GPUs, this machine has $NGPU"
    return
  fi
  if [ ! -f "$CKPT/tokenizer.json" ]; then
    record "$name" "SKIP" "needs the checkpoint"
    return
  fi
  # TP=1 leaves --device at auto, which must find the GPU by itself.
  local device=cuda
  [ "$tp" -eq 1 ] && device=auto
  timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/serve_check.py" --bin "$BIN_DIR" --model "$CKPT" \
    --tp "$tp" --out "$out" --device "$device" "${extra[@]}"
  if [ "$RC" -ne 0 ] || [ ! -f "$out" ]; then
    record "$name" "FAIL" "$(why_failed)"
    return
  fi
  same=""
  if [ "$out" != "$WORK/serve_tp1.json" ] && [ -f "$WORK/serve_tp1.json" ]; then
    same=$("$PYTHON" -c 'import json, sys
a, b = (json.load(open(p))["texts"] for p in sys.argv[1:])
print(f"; greedy texts equal to tp1 with graphs: {sum(x == y for x, y in zip(a, b))}/{len(a)}")' \
      "$WORK/serve_tp1.json" "$out")
  fi
  record "$name" "PASS" \
    "tpserve serve --device $device ($mode), $tp worker process(es): 8/8 concurrent completions of 32 tokens$same (${SECS}s)"
}

# step_invariance: the same 32 greedy requests together and one at a time (half of them hitting
# the prefix cache the second time), with --batch-invariant (every text must match) and without
# (how many differ is reported, not judged: bf16 kernels that depend on the batch may differ).
step_invariance() {
  local on="$WORK/invariance_on.json" off="$WORK/invariance_off.json" figures
  rm -f "$on" "$off"
  if [ "$NGPU" -lt 1 ] || [ ! -f "$CKPT/tokenizer.json" ]; then
    record "batch invariance" "SKIP" "needs a GPU and the checkpoint"
    return
  fi
  timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/invariance_check.py" --bin "$BIN_DIR" --model "$CKPT" \
    --out "$on" --serve-arg=--batch-invariant
  local on_secs=$SECS
  timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/invariance_check.py" --bin "$BIN_DIR" --model "$CKPT" \
    --out "$off"
  if [ ! -f "$on" ]; then
    record "batch invariance" "FAIL" "--batch-invariant run: $(why_failed)"
    return
  fi
  figures=$("$PYTHON" -c 'import json, os, sys
on = json.load(open(sys.argv[1]))
text = "--batch-invariant: %d/%d identical alone and together, %.2f s together" % (
    on["identical"], on["total"], on["concurrent_seconds"])
if os.path.exists(sys.argv[2]):
    off = json.load(open(sys.argv[2]))
    text += "; default: %d/%d, %.2f s" % (off["identical"], off["total"], off["concurrent_seconds"])
print(text)
sys.exit(0 if on["identical"] == on["total"] else 1)' "$on" "$off") && RC=0 || RC=$?
  if [ "$RC" -eq 0 ]; then
    record "batch invariance" "PASS" "$figures (${on_secs}s)"
  else
    record "batch invariance" "FAIL" "$figures"
  fi
}

# script_check LABEL TAG GPUS SCRIPT [ARG...]: runs tests/gpu/SCRIPT.py on the checkpoint
# (--bin, --model, --out $WORK/TAG.json, then the ARGs), shows its output, and records LABEL with
# the lines it printed after "SCRIPT " as the figures; SKIP with fewer than GPUS GPUs.
script_check() {
  local label=$1 tag=$2 gpus=$3 script=$4
  shift 4
  local out="$WORK/$tag.json" txt="$WORK/$tag.txt" figures
  rm -f "$out" "$txt"
  if [ "$NGPU" -lt "$gpus" ] || [ ! -f "$CKPT/tokenizer.json" ]; then
    record "$label" "SKIP" "needs $gpus GPU(s) and the checkpoint"
    return
  fi
  timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/$script.py" --bin "$BIN_DIR" --model "$CKPT" \
    --out "$out" "$@" > "$txt"
  cat "$txt"
  figures=$(sed -n "s/^$script //p" "$txt" | tr '\n' ' ')
  if [ "$RC" -eq 0 ]; then
    record "$label" "PASS" "$figures(${SECS}s)"
  else
    record "$label" "FAIL" "${figures:-$(why_failed)}"
  fi
}

# step_extras TP: log probabilities and sampling controls (issue 13) on TP GPUs against the CPU
# backend's f32 on the same checkpoint: prompt and first-token log probabilities within 0.15.
step_extras() {
  script_check "logprobs + penalties tp$1" "extras_tp$1" "$1" extras_check --tp "$1"
}

# step_structured TP: structured outputs (issue 13, item 3) on TP GPUs: constrained requests
# beside plain ones; finished outputs must parse and validate (structured_check.py).
step_structured() {
  script_check "structured outputs tp$1" "structured_tp$1" "$1" structured_check \
    "--serve-arg=--tensor-parallel-size=$1"
}

# step_lora: issue 10 on CUDA. Three random PEFT adapters on the checkpoint
# (make_lora_adapters.py); per adapter, transformers + PEFT's logits and greedy ids
# (hf_reference.py --lora, bfloat16 and float32) against tpserve's from the logits example with
# --lora-adapter: prompts prefilled in chunks (the LoRA tiles of a prefill) and every position as
# a one-token decode step (the LoRA CUDA graphs), with compare.py's rule; then the base and the
# three adapters mixed in one batch over HTTP against each alone (lora_mixed_check.py), TP=1 and
# TP=2.
step_lora() {
  local dir="$WORK/lora" a tp out
  if [ "$NGPU" -lt 1 ] || [ ! -f "$CKPT/prompts.json" ]; then
    record "lora" "SKIP" "needs a GPU and the checkpoint"
    return
  fi
  rm -rf "$dir"
  timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/make_lora_adapters.py" "$CKPT" "$dir"
  if [ "$RC" -ne 0 ]; then
    record "lora adapters" "FAIL" "make_lora_adapters.py: $(why_failed)"
    return
  fi
  record "lora adapters" "PASS" "a1 r8 q,v; a2 r16 all-linear rslora; a3 r4 k,o,gate,down (${SECS}s)"
  for a in a1 a2 a3; do
    rm -rf "$REF/lora_$a"
    timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/hf_reference.py" "$CKPT" "$REF/lora_$a" \
      --new-tokens "$NEW_TOKENS" --device "$REF_DEVICE" --dtypes bfloat16,float32 --lora "$dir/$a"
    if [ "$RC" -ne 0 ]; then
      record "hf reference lora $a" "FAIL" "hf_reference.py --lora: $(why_failed)"
      continue
    fi
    record "hf reference lora $a" "PASS" \
      "$(sed -n 's/.*"implementation": "\([^"]*\)".*/\1/p' "$REF/lora_$a/hf_greedy_float32.json") (${SECS}s)"
    ours_logits "lora-$a" 1 bfloat16 --lora-adapter "$dir/$a" --max-lora-rank 16
    ours_logits "lora-$a-decode" 1 bfloat16 --lora-adapter "$dir/$a" --max-lora-rank 16 --chunk 1
    for tag in "lora-$a" "lora-$a-decode"; do
      if [ -s "$OURS/$tag.f32" ]; then
        run_compare "$tag vs hf+peft" --truth "$REF/lora_$a/hf_float32.f32" \
          --peer "$REF/lora_$a/hf_bfloat16.f32" --ours "$OURS/$tag.f32" --vocab "$VOCAB" \
          --prompts "$CKPT/prompts.json"
      fi
    done
    if [ -s "$OURS/lora-$a.json" ]; then
      run_compare "greedy lora-$a" --greedy "$OURS/lora-$a.json" \
        --greedy-ref "$REF/lora_$a/hf_greedy_bfloat16.json" \
        --greedy-truth "$REF/lora_$a/hf_greedy_float32.json" --ref-label bfloat16 --near-tie 0.1
    fi
  done
  for tp in 1 2; do
    out="$WORK/lora_mixed_tp$tp.json"
    rm -f "$out"
    if [ "$tp" -gt "$NGPU" ]; then
      record "lora mixed tp$tp" "SKIP" "skipped: needs $tp GPUs, this machine has $NGPU"
      continue
    fi
    timed "$STEP_TIMEOUT" "$PYTHON" "$HERE/lora_mixed_check.py" --bin "$BIN_DIR" --model "$CKPT" \
      --adapters "$dir" --out "$out" --serve-arg=--tensor-parallel-size="$tp"
    if [ "$RC" -eq 0 ] && [ -f "$out" ]; then
      record "lora mixed tp$tp" "PASS" "$("$PYTHON" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("%d/%d identical mixed and alone (--batch-invariant), adapters change the output: %s, %.2f s together" % (
    r["identical"], r["total"], r["adapters_change_output"], r["concurrent_seconds"]))' "$out") (${SECS}s)"
    elif [ -f "$out" ]; then
      record "lora mixed tp$tp" "FAIL" "$("$PYTHON" -c 'import json, sys
print("; ".join(json.load(open(sys.argv[1]))["problems"]))' "$out")"
    else
      record "lora mixed tp$tp" "FAIL" "$(why_failed)"
    fi
  done
}

# step_embed TP: /v1/embeddings (issue 13, item 5) with `--task embed` on the checkpoint against
# transformers' AutoModel (last-token pooling of the final normed hidden state, normalized):
# cosine >= 0.999 in bf16, batched equal to one at a time.
step_embed() {
  script_check "embeddings tp$1" "embed_tp$1" "$1" embed_check --tp "$1" --ref-device "$REF_DEVICE"
}

# step_memory: the 8B shape with dummy weights through `tpserve generate` (real worker process):
# at --gpu-memory-utilization 0.9 it answers; at a share smaller than the weights it must fail at
# start with the memory profile's message, not later.
step_memory() {
  local dir="$WORK/llama8b-dummy" bin="$BIN_DIR/tpserve"
  if [ ! -f "$CKPT/tokenizer.json" ]; then
    record "memory (8B dummy)" "SKIP" "needs the checkpoint's tokenizer"
    return
  fi
  mkdir -p "$dir"
  cp "$HERE/llama3-8b-config.json" "$dir/config.json"
  cp "$CKPT/tokenizer.json" "$dir/tokenizer.json"
  timed "$STEP_TIMEOUT" "$bin" generate --model "$dir" --load-format dummy --device cuda \
    --prompt "hello" --max-tokens 16 --ignore-eos
  local ok_rc=$RC ok_secs=$SECS
  timed "$STEP_TIMEOUT" "$bin" generate --model "$dir" --load-format dummy --device cuda \
    --gpu-memory-utilization 0.05 --prompt "hello" --max-tokens 16 2>"$WORK/memory.err"
  local why
  why=$(grep -o 'no KV cache block fits[^;]*' "$WORK/memory.err" | head -1 || true)
  if [ "$ok_rc" -eq 0 ] && [ "$RC" -ne 0 ] && [ -n "$why" ]; then
    record "memory (8B dummy)" "PASS" \
      "0.9: generated (${ok_secs}s); 0.05: refused at start: \"$why\""
  else
    record "memory (8B dummy)" "FAIL" \
      "0.9: exit $ok_rc; 0.05: exit $RC, $(tail -1 "$WORK/memory.err" | cut -c1-160)"
  fi
}

step_paris() {
  local bin="$BIN_DIR/tpserve" answer
  rm -f "$WORK/paris.txt"
  if [ -z "$SMOLLM2_GGUF" ] || [ ! -f "$SMOLLM2_GGUF" ]; then
    record "paris (smollm2)" "SKIP" "skipped: SMOLLM2_GGUF not set/missing"
    return
  fi
  if [ ! -x "$bin" ]; then
    record "paris (smollm2)" "FAIL" "no binary $bin"
    return
  fi
  echo "+ $bin generate ... > $WORK/paris.txt"
  timed "$STEP_TIMEOUT" "$bin" generate --model "$SMOLLM2_GGUF" --device cuda --chat \
    --system "You are a helpful assistant." --prompt "What is the capital of France?" \
    --max-tokens 32 >"$WORK/paris.txt"
  cat "$WORK/paris.txt"
  answer=$(tr '\n\t' '  ' <"$WORK/paris.txt" | cut -c1-80)
  if [ "$RC" -eq 0 ] && grep -q "Paris" "$WORK/paris.txt"; then
    record "paris (smollm2)" "PASS" "\"$answer\" (${SECS}s)"
  elif [ "$RC" -eq 0 ]; then
    record "paris (smollm2)" "FAIL" "no \"Paris\" in \"$answer\""
  else
    record "paris (smollm2)" "FAIL" "$(why_failed)"
  fi
}

step_bench() {
  local bin="$BIN_DIR/examples/bench_device"
  rm -f "$WORK/bench_8b.json" "$WORK/bench_8b.txt"
  if [ "${SKIP_BENCH:-0}" = 1 ]; then
    record "bench 8B" "SKIP" "SKIP_BENCH=1 (tests/gpu/bench.sh runs bench_device too)"
    return
  fi
  if [ ! -x "$bin" ]; then
    record "bench 8B" "FAIL" "no binary $bin"
    return
  fi
  echo "+ $bin --config $HERE/llama3-8b-config.json --dtype bfloat16 --json $WORK/bench_8b.json"
  local start
  start=$(date +%s)
  RC=0
  timeout -k 10 "$BENCH_TIMEOUT" "$bin" --config "$HERE/llama3-8b-config.json" \
    --dtype bfloat16 --json "$WORK/bench_8b.json" 2>&1 | tee "$WORK/bench_8b.txt" ||
    RC=${PIPESTATUS[0]}
  SECS=$(($(date +%s) - start))
  if [ "$RC" -eq 0 ] && "$PYTHON" -c 'import json, sys; json.load(open(sys.argv[1]))' \
    "$WORK/bench_8b.json" 2>/dev/null; then
    record "bench 8B" "PASS" "Llama-3-8B shape, bf16, dummy weights: its table above (${SECS}s)"
  else
    record "bench 8B" "FAIL" "$(why_failed)"
  fi
}

print_table() {
  echo
  echo "== tpserve GPU evidence ($(date -u +%FT%TZ), $NGPU GPU(s), work dir $WORK)"
  awk -F'\t' '{ printf "%-24s %-9s %s\n", $1, $2, $3 }' "$TSV"
  awk -F'\t' '{ n[$2]++ } END { printf "== %d PASS, %d EXPLAINED, %d SKIP, %d FAIL\n",
    n["PASS"], n["EXPLAINED"], n["SKIP"], n["FAIL"] }' "$TSV"
}

main() {
  mkdir -p "$WORK" "$OURS"
  rm -f "$TSV" "$JSONL"
  : >"$TSV"
  step_env
  step_checkpoint
  if [ -n "${ONLY:-}" ]; then
    local only args
    for only in $ONLY; do
      args=()
      [[ $only == *:* ]] && IFS=: read -r -a args <<<"${only#*:}"
      "step_${only%%:*}" "${args[@]}"
    done
    print_table
    ! grep -q $'\tFAIL\t' "$TSV"
    return
  fi
  step_reference
  step_bf16
  step_kernels
  step_decode
  step_f16
  step_fp8
  step_fp8_kv
  step_fp8_checkpoint channel
  step_fp8_checkpoint static
  step_int4_checkpoint awq
  step_int4_checkpoint gptq
  step_int4_checkpoint gptq-act
  step_tp2
  step_serve 1
  step_serve 1 eager
  step_serve 2
  step_serve 2 eager
  step_invariance
  step_extras 1
  step_extras 2
  step_structured 1
  step_structured 2
  step_lora
  step_embed 1
  step_embed 2
  step_memory
  step_paris
  step_bench
  print_table
  ! grep -q $'\tFAIL\t' "$TSV"
}

# Everything goes to the terminal and to run.log; the small results are copied to $OUT last.
mkdir -p "$WORK"
status=0
main 2>&1 | tee "$LOG" || status=$?
if [ -n "$OUT" ]; then
  mkdir -p "$OUT"
  for f in run.log results.tsv compare.jsonl env.txt paris.txt bench_8b.json bench_8b.txt \
    invariance_on.json invariance_off.json extras_tp1.json extras_tp2.json structured_tp1.json \
    structured_tp2.json embed_tp1.json embed_tp2.json; do
    if [ -f "$WORK/$f" ]; then
      cp "$WORK/$f" "$OUT/"
    fi
  done
fi
exit "$status"
