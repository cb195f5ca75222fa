#!/usr/bin/env python3
"""Runs Hugging Face transformers on the test checkpoint: the reference logits and greedy ids.

What: for each dtype in bfloat16, float16 and float32, loads CKPT_DIR (written by
make_checkpoint.py) with attn_implementation="eager" and writes
  OUTDIR/hf_<dtype>.f32          the logits of EVERY position of every prompt of
                                 CKPT_DIR/prompts.json, prompts concatenated in order, as raw
                                 little-endian float32 rows [total_tokens, vocab] (the layout of
                                 tpserve's `logits` example);
  OUTDIR/hf_greedy_<dtype>.json  {"new_ids": [32 ids], "top": [[[id, logit] x5] per step], ...}:
                                 greedy decoding of 32 new tokens after prompts[0] (no EOS
                                 stop), through prefill + one-token decode steps with a KV cache.
float32 is the truth (the bfloat16 weights upcast exactly; TF32 off); bfloat16 and float16 show
how far the reference implementation itself is from the truth at those dtypes, which is the
yardstick compare.py holds tpserve to.

Why: the GPU numerical checks (tests/gpu/run.sh) need an independent implementation on the same
weights; the GPU machine has torch and transformers but no network.

With --lora ADAPTER_DIR, the model runs with that PEFT LoRA adapter: through peft's own
PeftModel (unmerged, as PEFT users run it) when peft is installed, else with the adapter merged
into the weights here (W + scale B A in float32), which the output records say.

With --fp8, the model emulates tpserve's `--quantization fp8` (the reference "computed from the
same dequantized weights" of issue 12): every linear layer's weight rounded to FP8 E4M3 with one
scale per fused tensor as tpserve fuses them (q, k and v together; gate and up together; o; down;
scale = amax / 448; the elements times its reciprocal, rounded to nearest even, saturating, as
tpserve and vLLM quantize), dequantized (x scale) to the dtype; and
the input of every linear layer but the lm_head rounded the same way when it has more than 8
rows: with one dynamic scale over all its rows below 512 rows, one per row (per token) from 512
(tpserve multiplies up to 8 rows in the GEMV with the activations unquantized, more through
cuBLASLt's FP8 GEMM on activations quantized so: linear.rs, FP8_ROW_SCALES_MIN_ROWS).

With --fp8-inputs (for pre-quantized FP8 checkpoints, run on their dequantized twin from
make_fp8_checkpoint.py), the weights stay as loaded and only the inputs of products above 8 rows
are rounded to FP8 as tpserve rounds them for that checkpoint: with the static scale
CKPT_DIR/input_scales.json gives the layer (x / scale rounded to E4M3, saturating at 448); else
with dynamic scales as for --fp8, whatever the checkpoint's weight scales.

With --fp8-kv, the model emulates tpserve's `--kv-cache-dtype fp8` (scales of 1, as for a
checkpoint without `k_scale` / `v_scale`): the keys (after RoPE) and values every attention
reads are rounded to E4M3 (nearest even, saturating at +-448) and back to the dtype; queries are
not. tpserve rounds the keys and values once, as it writes them to the cache; this rounds them
at every read, which gives the same values (E4M3 values are exact in every dtype here).

How: python3 hf_reference.py CKPT_DIR OUTDIR [--device cuda|cpu] [--new-tokens 32]
          [--dtypes bfloat16,float16,float32] [--lora ADAPTER_DIR] [--fp8 | --fp8-inputs]
          [--fp8-kv]
Each prompt runs as one sequence in one forward pass (positions from 0, no BOS added: the ids are
used exactly as given).
"""

import argparse
import inspect
import json
import os
import sys
import time

import numpy as np
import torch
from transformers import LlamaForCausalLM

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOP_K = 5


def load(ckpt: str, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def with_lora(model, adapter: str) -> tuple:
    """`model` with the PEFT adapter in `adapter`; returns (model, implementation name)."""
    try:
        from peft import PeftModel
    except ImportError:
        return merge_lora(model, adapter), "transformers-eager+merged-lora"
    return PeftModel.from_pretrained(model, adapter).eval(), "transformers-eager+peft"


@torch.no_grad()
def merge_lora(model, adapter: str):
    """Adds scale * B A of every adapter module to its base weight (float32 math)."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        name = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        w = modules[name].weight
        delta = scale * (b.float().to(w.device) @ a.float().to(w.device))
        w.copy_((w.float() + delta).to(w.dtype))
    return model


E4M3_MAX = 448.0
# The inputs of tpserve's GEMV, which multiplies FP8 weights into unquantized activations.
FP8_GEMV_ROWS = 8
# From this many rows tpserve quantizes dynamic activations per row, below per tensor.
FP8_ROW_SCALES_MIN_ROWS = 512


def fp8_round(t: torch.Tensor) -> torch.Tensor:
    """t rounded to E4M3 with one scale (amax / 448) and dequantized, in float32."""
    t = t.float()
    amax = t.abs().max()
    scale = amax / E4M3_MAX if amax > 0 else torch.ones((), device=t.device)
    q = (t * torch.reciprocal(scale)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.float() * scale


@torch.no_grad()
def emulate_fp8(model) -> None:
    """tpserve's `--quantization fp8` on `model` (see the module's docstring)."""
    for layer in model.model.layers:
        groups = [
            [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
            [layer.self_attn.o_proj],
            [layer.mlp.gate_proj, layer.mlp.up_proj],
            [layer.mlp.down_proj],
        ]
        for group in groups:
            fused = fp8_round(torch.cat([m.weight.float() for m in group]))
            for m, w in zip(group, fused.split([m.weight.shape[0] for m in group])):
                m.weight.copy_(w.to(m.weight.dtype))
                m.register_forward_pre_hook(quantize_input_dynamic)


def quantize_input_static(scale: float):
    """A pre-hook rounding inputs above 8 rows to E4M3 with a fixed scale, in float32 as
    tpserve's kernel has it: (448 x scale) / 448, its elements multiplied by its reciprocal."""

    def hook(_module, args):
        (x,) = args
        if x.numel() // x.shape[-1] <= FP8_GEMV_ROWS:
            return None
        s = torch.tensor(scale, dtype=torch.float32, device=x.device) * E4M3_MAX / E4M3_MAX
        q = (x.float() * torch.reciprocal(s)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return ((q.float() * s).to(x.dtype),)

    return hook


def quantize_input_dynamic(_module, args):
    """A pre-hook rounding inputs above 8 rows to E4M3 with dynamic scales: one over all rows
    below FP8_ROW_SCALES_MIN_ROWS rows, one per row from there."""
    (x,) = args
    rows = x.numel() // x.shape[-1]
    if rows <= FP8_GEMV_ROWS:
        return None
    if rows < FP8_ROW_SCALES_MIN_ROWS:
        return (fp8_round(x).to(x.dtype),)
    t = x.float()
    amax = t.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (t * torch.reciprocal(scale)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return ((q.float() * scale).to(x.dtype),)


def emulate_fp8_inputs(model, ckpt: str) -> str:
    """Rounds the inputs of every linear layer but the lm_head as tpserve's FP8 products do
    (weights as loaded); returns which scales."""
    path = os.path.join(ckpt, "input_scales.json")
    static = json.load(open(path)) if os.path.exists(path) else None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            if static is not None:
                hook = quantize_input_static(static[name])
            else:
                hook = quantize_input_dynamic
            module.register_forward_pre_hook(hook)
    return "static" if static is not None else "dynamic"


def e4m3(t: torch.Tensor) -> torch.Tensor:
    """t rounded to E4M3 (scale 1, saturating) and back to its dtype."""
    return t.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float().to(t.dtype)


def emulate_fp8_kv() -> list:
    """Rounds the keys and values of every eager attention to E4M3 (see the module's
    docstring); returns a one-element list counting the calls, to check the patch is used."""
    import transformers.models.llama.modeling_llama as llama

    original = llama.eager_attention_forward
    calls = [0]

    def fp8_kv_attention(module, query, key, value, *args, **kwargs):
        calls[0] += 1
        return original(module, query, e4m3(key), e4m3(value), *args, **kwargs)

    llama.eager_attention_forward = fp8_kv_attention
    return calls


@torch.no_grad()
def write_logits(model, prompts, device: str, path: str) -> dict:
    """Writes all positions' logits; returns a few figures for the log."""
    stds, maxabs = [], []
    with open(path, "wb") as f:
        for ids in prompts:
            x = torch.tensor([ids], dtype=torch.long, device=device)
            logits = model(input_ids=x, use_cache=False).logits[0].float()
            stds.append(logits.std(dim=-1).mean().item())
            maxabs.append(logits.abs().max().item())
            arr = logits.cpu().numpy().astype("<f4", copy=False)
            f.write(np.ascontiguousarray(arr).tobytes())
    return {"mean_row_std": float(np.mean(stds)), "max_abs": float(np.max(maxabs))}


def cache_of(out):
    """The KV cache of a forward's output (`cache` in recent transformers 5, else
    `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def greedy(model, prompt, device: str, n_new: int) -> dict:
    """Greedy decoding with a KV cache: one prefill, then one token per step. No EOS stop."""
    # transformers 5.x renamed forward's `past_key_values` to `cache` at some minor version.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    x = torch.tensor([prompt], dtype=torch.long, device=device)
    out = model(input_ids=x, use_cache=True)
    past = cache_of(out)
    logits = out.logits[0, -1].float()
    new_ids, top = [], []
    for step in range(n_new):
        vals, idx = torch.topk(logits, TOP_K)
        top.append([[int(i), round(float(v), 5)] for i, v in zip(idx.tolist(), vals.tolist())])
        nxt = int(idx[0])
        new_ids.append(nxt)
        if step + 1 == n_new:
            break
        out = model(
            input_ids=torch.tensor([[nxt]], dtype=torch.long, device=device),
            use_cache=True,
            **{cache_kw: past},
        )
        past = cache_of(out)
        logits = out.logits[0, -1].float()
    return {"new_ids": new_ids, "top": top}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("outdir")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtypes", default="bfloat16,float16,float32")
    ap.add_argument("--lora", help="a PEFT LoRA adapter directory to run with")
    ap.add_argument("--fp8", action="store_true", help="emulate tpserve's --quantization fp8")
    ap.add_argument(
        "--fp8-inputs",
        action="store_true",
        help="round the linear layers' inputs as tpserve's FP8 products do (weights as loaded)",
    )
    ap.add_argument(
        "--fp8-kv",
        action="store_true",
        help="round the keys and values attention reads to E4M3 (--kv-cache-dtype fp8)",
    )
    args = ap.parse_args()
    kv_calls = emulate_fp8_kv() if args.fp8_kv else None

    # The truth is plain float32 (no TF32); the other dtypes run at torch's defaults.
    torch.set_float32_matmul_precision("highest")
    with open(os.path.join(args.ckpt, "prompts.json")) as f:
        prompts = json.load(f)["prompts"]
    os.makedirs(args.outdir, exist_ok=True)
    total = sum(len(p) for p in prompts)
    print(
        f"hf_reference: {len(prompts)} prompts, {total} positions, device {args.device}, "
        f"torch {torch.__version__}",
        file=sys.stderr,
    )
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        t0 = time.time()
        model = load(args.ckpt, dtype, args.device)
        implementation = "transformers-eager"
        if args.lora:
            model, implementation = with_lora(model, args.lora)
        if args.fp8:
            emulate_fp8(model)
            implementation += "+fp8-emulated"
        if args.fp8_inputs:
            implementation += f"+fp8-{emulate_fp8_inputs(model, args.ckpt)}-inputs"
        if kv_calls is not None:
            implementation += "+fp8-kv-cache"
        out = os.path.join(args.outdir, f"hf_{name}.f32")
        figs = write_logits(model, prompts, args.device, out)
        if kv_calls is not None and kv_calls[0] == 0:
            raise SystemExit("--fp8-kv: the model never called eager_attention_forward")
        g = greedy(model, prompts[0], args.device, args.new_tokens)
        g.update({"dtype": name, "prompt_index": 0, "implementation": implementation})
        with open(os.path.join(args.outdir, f"hf_greedy_{name}.json"), "w") as f:
            json.dump(g, f)
            f.write("\n")
        print(
            f"hf_reference: {name}: logits row std {figs['mean_row_std']:.3f}, max |logit| "
            f"{figs['max_abs']:.2f}; greedy {g['new_ids'][:8]}...; {time.time() - t0:.1f}s",
            file=sys.stderr,
        )
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
