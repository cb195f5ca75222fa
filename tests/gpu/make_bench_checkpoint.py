#!/usr/bin/env python3
"""Writes a Llama-3-8B-shaped checkpoint of random weights, for bench_device --checkpoint: loading
a checkpoint from disk, and the speed of a pre-quantized FP8 checkpoint's weights as stored
(issue 12).

What: OUTDIR/config.json is tests/gpu/llama3-8b-config.json, with a compressed-tensors
quantization_config (--layout channel: llm-compressor's FP8_DYNAMIC, per-channel weight scales,
per-token dynamic activations), AutoFP8's (--layout tensor: quant_method fp8, per-tensor weight
scales, dynamic activations), AutoAWQ's or AutoGPTQ's (--layout awq|gptq|gptq-act: 4-bit, groups
of 128, gptq-act in act-order, packed by make_int4_checkpoint.py's functions), or none (--layout
bf16); OUTDIR/model.safetensors holds every linear weight (normal(0, 0.02)) in F8_E4M3 with its
`weight_scale`, packed 4-bit, or in bfloat16, and the embedding, lm_head and norms in bfloat16.
About 9 GB (FP8), 5 GB (4-bit) or 16 GB (bf16); a minute on an H200 machine.

Why: `--load-format dummy` gives random weights made on the device (or quantized at load with
per-tensor scales); reading a checkpoint, and a pre-quantized checkpoint's layout (per-row
scales, per-token activations), only a checkpoint on disk exercises.

How: python3 make_bench_checkpoint.py OUTDIR [--layout channel|tensor|awq|gptq|gptq-act|bf16]
     [--device cuda]
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_int4_checkpoint  # noqa: E402

E4M3_MAX = 448.0
INT4_GROUP = 128


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--layout", choices=["channel", "tensor", "awq", "gptq", "gptq-act", "bf16"],
                    default="channel")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    with open(os.path.join(HERE, "llama3-8b-config.json")) as f:
        config = json.load(f)
    h, inter = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim", h // config["num_attention_heads"])
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    vocab = config["vocab_size"]
    gen = torch.Generator(device=args.device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=args.device) * 0.02

    tensors = {}

    def linear(name, rows, cols):
        w = randn(rows, cols)
        if args.layout == "bf16":
            tensors[f"{name}.weight"] = w.bfloat16().cpu()
            return
        if args.layout in ("awq", "gptq", "gptq-act"):
            layer, _ = make_int4_checkpoint.pack(args.layout, f"{name}.weight", w, INT4_GROUP)
            for suffix, v in layer.items():
                tensors[f"{name}.{suffix}"] = v
            return
        if args.layout == "channel":
            scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX
        else:
            scale = w.abs().max() / E4M3_MAX
        tensors[f"{name}.weight"] = (w / scale).to(torch.float8_e4m3fn).cpu()
        tensors[f"{name}.weight_scale"] = scale.float().cpu()

    tensors["model.embed_tokens.weight"] = randn(vocab, h).bfloat16().cpu()
    tensors["lm_head.weight"] = randn(vocab, h).bfloat16().cpu()
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, rows, cols in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", inter, h),
            ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ]:
            linear(f"{p}.{name}", rows, cols)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    os.makedirs(args.outdir, exist_ok=True)
    save_file(tensors, os.path.join(args.outdir, "model.safetensors"))
    if args.layout == "channel":
        fp8 = lambda strategy, dynamic: {  # noqa: E731
            "num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True,
            "dynamic": dynamic,
        }
        quantization = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": fp8("channel", False),
                                          "input_activations": fp8("token", True)}},
            "ignore": ["lm_head"],
        }
    elif args.layout == "tensor":
        quantization = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    elif args.layout in ("awq", "gptq", "gptq-act"):
        quantization = make_int4_checkpoint.quantization_config(args.layout, INT4_GROUP)
    else:
        quantization = None
    if quantization is not None:
        config["quantization_config"] = quantization
    config["torch_dtype"] = "bfloat16"
    with open(os.path.join(args.outdir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    size = os.path.getsize(os.path.join(args.outdir, "model.safetensors"))
    print(f"make_bench_checkpoint: {args.layout}: {size / 1e9:.2f} GB -> {args.outdir}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
