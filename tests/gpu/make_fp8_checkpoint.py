#!/usr/bin/env python3
"""Writes a pre-quantized FP8 checkpoint of the test checkpoint, in a format people publish, and
its dequantized twin: the inputs of issue 12's checks of pre-quantized FP8 checkpoints.

What: from CKPT_DIR (make_checkpoint.py's bfloat16 Llama), OUTDIR/ holds
  config.json        with the layout's `quantization_config`
  model.safetensors  every linear layer's weight (q, k, v, o, gate, up, down) in F8_E4M3 with its
                     scales; embeddings, norms and the lm_head as they were (bfloat16)
  tokenizer.json, prompts.json  copied
and OUTDIR/dequantized/ the same model with every FP8 weight dequantized (E4M3 value x scale, in
float32) and no quantization_config: the weights both implementations multiply, for
hf_reference.py. With static activation scales, OUTDIR/dequantized/input_scales.json maps each
linear layer to the activation scale tpserve uses for it (the largest of q/k/v's, and of
gate/up's, as vLLM fuses them), for hf_reference.py --fp8-inputs (which otherwise rounds them
with dynamic scales as tpserve does).

Layouts (--layout):
  channel  llm-compressor's FP8_DYNAMIC: compressed-tensors, format float-quantized, weights
           strategy channel (`weight_scale` [rows, 1] = row amax / 448), input activations
           dynamic per token; lm_head ignored.
  static   AutoFP8 / vLLM Fp8Config: quant_method fp8, activation_scheme static: one scalar
           `weight_scale` per tensor (amax / 448) and a scalar `input_scale` per layer,
           calibrated here as the largest |input| over every prompt of prompts.json / 448.
E4M3 rounding is torch's (round to nearest even); no value exceeds 448 by construction.

Why: the GPU machine has no network, so the checkpoints are made there from the test weights,
in the formats' own tensor names, dtypes and config keys.

How: python3 make_fp8_checkpoint.py CKPT_DIR OUTDIR --layout channel|static [--device cuda]
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from quantized_twin import LINEARS, is_linear, twin_dir, write_pair

E4M3_MAX = 448.0
# Layers that share their input in tpserve (one quantized activation, one static scale).
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def quantization_config(layout: str) -> dict:
    if layout == "static":
        return {"quant_method": "fp8", "activation_scheme": "static"}
    args = lambda strategy, dynamic: {  # noqa: E731
        "num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True,
        "dynamic": dynamic, "group_size": None, "block_structure": None, "observer": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": args("channel", False),
                "input_activations": args("token", True),
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }


@torch.no_grad()
def calibrate(ckpt: str, device: str) -> dict:
    """The largest |input| of every linear layer over every prompt, by layer name."""
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()
    amax = {}

    def hook(name):
        def record(_module, args):
            amax[name] = max(amax.get(name, 0.0), args[0].abs().max().item())

        return record

    for name, module in model.named_modules():
        if name.split(".")[-1] in LINEARS:
            module.register_forward_pre_hook(hook(name))
    with open(os.path.join(ckpt, "prompts.json")) as f:
        for prompt in json.load(f)["prompts"]:
            model(torch.tensor([prompt], device=device))
    del model
    return amax


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("outdir")
    ap.add_argument("--layout", choices=["channel", "static"], required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    tensors = load_file(os.path.join(args.ckpt, "model.safetensors"), device=args.device)
    deq_dir = twin_dir(args.outdir)
    amax_in = calibrate(args.ckpt, args.device) if args.layout == "static" else {}
    fp8, deq = {}, {}
    for name, t in tensors.items():
        if not is_linear(name):
            fp8[name] = t.contiguous()
            deq[name] = t.float().contiguous()
            continue
        w = t.float()
        if args.layout == "channel":
            scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX  # [rows, 1]
        else:
            scale = w.abs().max() / E4M3_MAX  # a scalar, shape []
        q = (w / scale).to(torch.float8_e4m3fn)
        base = name[: -len(".weight")]
        fp8[name] = q.contiguous()
        fp8[f"{base}.weight_scale"] = scale.float().contiguous()
        deq[name] = (q.float() * scale).contiguous()
        if args.layout == "static":
            fp8[f"{base}.input_scale"] = torch.tensor(
                amax_in[base] / E4M3_MAX,
                dtype=torch.float32,
                device=args.device,
            )
    write_pair(args.ckpt, args.outdir, fp8, deq, quantization_config(args.layout))

    if args.layout == "static":
        # tpserve's static scale for a fused layer is the largest of its parts' (vLLM's rule).
        fused = {}
        for name, a in amax_in.items():
            key = (name.rsplit(".", 2)[0], FUSED.get(name.split(".")[-1], name.split(".")[-1]))
            fused[key] = max(fused.get(key, 0.0), a / E4M3_MAX)
        scales = {
            name: fused[(name.rsplit(".", 2)[0], FUSED.get(name.split(".")[-1], name.split(".")[-1]))]
            for name in amax_in
        }
        with open(os.path.join(deq_dir, "input_scales.json"), "w") as f:
            json.dump(scales, f, indent=1)
    print(
        f"make_fp8_checkpoint: {args.layout}: {sum(is_linear(n) for n in tensors)} FP8 weights "
        f"-> {args.outdir} (dequantized twin in {deq_dir})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
