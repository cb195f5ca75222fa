#!/usr/bin/env python3
"""Writes three random PEFT LoRA adapters for the test checkpoint (make_checkpoint.py).

What: OUTDIR/{a1,a2,a3}/{adapter_config.json, adapter_model.safetensors}, in PEFT's format
(keys `base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight`, float32), with non-zero
A and B (PEFT initialises B to zero, which would test nothing):
  a1  r 8,  lora_alpha 16, q_proj and v_proj
  a2  r 16, lora_alpha 32, use_rslora, "all-linear" (all seven projections)
  a3  r 4,  lora_alpha 8,  k_proj, o_proj, gate_proj and down_proj
A and B are normal with std 0.03, which makes each adapter's delta about as large as the
base layer's output (a visible change of the logits, not noise).

Why: issue 10's GPU evidence: tpserve's LoRA kernels against Hugging Face PEFT on the same
adapters (hf_reference.py --lora), each adapter alone and mixed in one batch.

With --bench N, writes N adapters l0..l{N-1} instead, each of rank --rank (default 16) on all
seven projections ("all-linear", or the comma-separated --targets): the LoRA benchmark's
(tests/gpu/bench.sh) on the 8B shape.

How: python3 make_lora_adapters.py CKPT_DIR OUTDIR [--seed 10] [--bench N [--rank R]
     [--targets q_proj,v_proj]]
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file

ADAPTERS = {
    "a1": {"r": 8, "lora_alpha": 16, "use_rslora": False,
           "target_modules": ["q_proj", "v_proj"]},
    "a2": {"r": 16, "lora_alpha": 32, "use_rslora": True, "target_modules": "all-linear"},
    "a3": {"r": 4, "lora_alpha": 8, "use_rslora": False,
           "target_modules": ["k_proj", "o_proj", "gate_proj", "down_proj"]},
}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STD = 0.03


def shapes(cfg: dict) -> dict:
    """(in, out) of each projection."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--bench", type=int, default=0, help="write this many l<i> adapters instead")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="all-linear",
                    help="with --bench: comma-separated projections, or all-linear")
    args = ap.parse_args()
    adapters = ADAPTERS
    if args.bench:
        targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
        adapters = {f"l{i}": {"r": args.rank, "lora_alpha": 2 * args.rank, "use_rslora": False,
                              "target_modules": targets} for i in range(args.bench)}
    with open(os.path.join(args.ckpt, "config.json")) as f:
        cfg = json.load(f)
    dims = shapes(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    for name, spec in adapters.items():
        targets = ALL if spec["target_modules"] == "all-linear" else spec["target_modules"]
        r = spec["r"]
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for module in targets:
                parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
                n_in, n_out = dims[module]
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=gen) * STD
                tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=gen) * STD
        out = os.path.join(args.outdir, name)
        os.makedirs(out, exist_ok=True)
        save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": args.ckpt,
            "r": r, "lora_alpha": spec["lora_alpha"], "lora_dropout": 0.0, "bias": "none",
            "use_rslora": spec["use_rslora"], "use_dora": False, "fan_in_fan_out": False,
            "target_modules": spec["target_modules"], "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True,
        }
        with open(os.path.join(out, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=1)
        print(f"{name}: r {r}, {len(tensors) // 2} modules -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
