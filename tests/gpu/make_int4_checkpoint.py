#!/usr/bin/env python3
"""Writes an AWQ or GPTQ checkpoint of the test checkpoint, packed as AutoAWQ and AutoGPTQ pack
them, and its dequantized twin: the inputs of issue 12's checks of 4-bit checkpoints.

What: from CKPT_DIR (make_checkpoint.py's bfloat16 Llama), OUTDIR/ holds
  config.json        with the format's `quantization_config`
  model.safetensors  every linear layer (q, k, v, o, gate, up, down) as `qweight`, `qzeros`,
                     `scales` (float16) and, for GPTQ, `g_idx`; embeddings, norms and the lm_head
                     as they were (bfloat16)
  tokenizer.json, prompts.json  copied
and OUTDIR/dequantized/ the same model with every packed weight dequantized ((q - zero) * scale,
in float32) and no quantization_config: the weights both implementations multiply, for
hf_reference.py.

Formats (--format):
  awq   AutoAWQ's GEMM packing: 4-bit, groups of --group inputs with zero points (min/max per
        group and output); qweight [in, out / 8] int32 holding 8 outputs in the order
        0, 2, 4, 6, 1, 3, 5, 7; qzeros [in / group, out / 8] alike; scales [in / group, out].
  gptq  AutoGPTQ's original format: 4-bit, symmetric (zero 8), groups of --group inputs in order
        (desc_act false); qweight [in / 8, out] holding 8 inputs in order; qzeros
        [in / group, out / 8] holding zero - 1; scales [in / group, out]; g_idx [in].
  gptq-act  the same with act-order (desc_act true): the inputs are quantized in a shuffled
        order (GPTQ's order of decreasing activation, here random), each run of --group of them
        a group, so g_idx [in] (each input's group) is out of order; qweight still holds the
        inputs in their own order. Products that share their inputs (q, k, v; gate, up) share
        the order, as GPTQ's (one Hessian per input) do.
The functions are shared with make_bench_checkpoint.py (--layout awq|gptq).

Why: the GPU machine has no network (and no AutoAWQ or GPTQModel), so the checkpoints are made
there from the test weights, in the formats' own tensor names, dtypes and config keys.

How: python3 make_int4_checkpoint.py CKPT_DIR OUTDIR --format awq|gptq|gptq-act [--group 128]
"""

import argparse
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from quantized_twin import is_linear, write_pair

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack: value i of a word is column AWQ_ORDER[i]


def quantization_config(fmt: str, group: int) -> dict:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
    return {"quant_method": "gptq", "bits": 4, "group_size": group,
            "desc_act": fmt == "gptq-act", "sym": True, "damp_percent": 0.01,
            "true_sequential": True}


@torch.no_grad()
def quantize(w: torch.Tensor, group: int, symmetric: bool):
    """w [out, in] -> (q [in, out] int, zeros [in / group, out] int, scales [in / group, out]
    float16): per group of inputs and output, min/max (or symmetric around 8) to 0..15."""
    out_f, in_f = w.shape
    g = w.float().t().reshape(in_f // group, group, out_f)  # [groups, group, out]
    if symmetric:
        scale = 2 * g.abs().amax(dim=1) / 15
        zero = torch.full_like(scale, 8.0)
    else:
        lo = g.amin(dim=1).clamp(max=0)
        hi = g.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / 15
        zero = (-lo / scale.clamp(min=1e-10)).round().clamp(1, 15)  # >= 1: GPTQ v1 stores z - 1
    scale = scale.clamp(min=1e-6).half()
    q = (g / scale.float()[:, None, :]).round() + zero[:, None, :]
    q = q.clamp(0, 15).reshape(in_f, out_f)
    return q.to(torch.int64), zero.to(torch.int64), scale


def dequantize(q, zeros, scales, group: int) -> torch.Tensor:
    """The weight [out, in] in float32."""
    in_f = q.shape[0]
    z = zeros.repeat_interleave(group, dim=0).float()
    s = scales.repeat_interleave(group, dim=0).float()
    assert z.shape[0] == in_f
    return ((q.float() - z) * s).t().contiguous()


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words of 32 bits as the int32 tensor safetensors stores (the same bits)."""
    return torch.from_numpy(words.cpu().numpy().astype(np.uint32).view(np.int32))


def pack_awq(q, zeros, scales) -> dict:
    qweight = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64, device=q.device)
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int64, device=q.device)
    for i, col in enumerate(AWQ_ORDER):
        qweight |= q[:, col::8] << (4 * i)
        qzeros |= zeros[:, col::8] << (4 * i)
    return {"qweight": as_int32(qweight), "qzeros": as_int32(qzeros),
            "scales": scales.cpu().contiguous()}


def pack_gptq(q, zeros, scales, g_idx) -> dict:
    qweight = torch.zeros(q.shape[0] // 8, q.shape[1], dtype=torch.int64, device=q.device)
    for j in range(8):
        qweight |= q[j::8, :] << (4 * j)
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int64, device=q.device)
    for j in range(8):
        qzeros |= (zeros[:, j::8] - 1) << (4 * j)
    return {"qweight": as_int32(qweight), "qzeros": as_int32(qzeros),
            "scales": scales.cpu().contiguous(), "g_idx": g_idx.to(torch.int32).cpu()}


def act_order(name: str, in_f: int) -> torch.Tensor:
    """The order in which gptq-act quantizes the inputs of weight `name`: a permutation seeded by
    its layer and its input (q, k and v read one input, gate and up another)."""
    layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "0"
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
              "up_proj": "gate_up"}
    proj = name.split(".")[-2]
    seed = int(layer) * 10 + ["qkv", "o_proj", "gate_up", "down_proj"].index(
        shared.get(proj, proj))
    return torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))


def pack(fmt: str, name: str, w: torch.Tensor, group: int):
    """The tensors of one linear layer (by suffix) and its dequantized weight."""
    if fmt == "gptq-act":
        # Quantize the inputs in `order` (groups are runs of it), then store them in their own
        # order, with g_idx naming each input's group.
        in_f = w.shape[1]
        order = act_order(name, in_f).to(w.device)
        q, zeros, scales = quantize(w[:, order], group, symmetric=True)
        q_own = torch.empty_like(q)
        q_own[order] = q
        g_idx = torch.empty(in_f, dtype=torch.int64, device=w.device)
        g_idx[order] = torch.arange(in_f, device=w.device) // group
        deq = torch.empty(w.shape, dtype=torch.float32)
        deq[:, order.cpu()] = dequantize(q, zeros, scales, group).cpu()
        return pack_gptq(q_own, zeros, scales, g_idx), deq
    q, zeros, scales = quantize(w, group, symmetric=fmt == "gptq")
    if fmt == "awq":
        tensors = pack_awq(q, zeros, scales)
    else:
        tensors = pack_gptq(q, zeros, scales, torch.arange(q.shape[0]) // group)
    return tensors, dequantize(q, zeros, scales, group)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("outdir")
    ap.add_argument("--format", choices=["awq", "gptq", "gptq-act"], required=True)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    tensors = load_file(os.path.join(args.ckpt, "model.safetensors"), device=args.device)
    packed, deq = {}, {}
    for name, t in tensors.items():
        if not is_linear(name):
            packed[name] = t.cpu().contiguous()
            deq[name] = t.float().cpu().contiguous()
            continue
        layer, w = pack(args.format, name, t, args.group)
        base = name[: -len(".weight")]
        for suffix, v in layer.items():
            packed[f"{base}.{suffix}"] = v
        deq[name] = w.cpu()
    write_pair(args.ckpt, args.outdir, packed, deq,
               quantization_config(args.format, args.group))
    print(
        f"make_int4_checkpoint: {args.format}, groups of {args.group}: "
        f"{sum(is_linear(n) for n in tensors)} packed weights -> {args.outdir} "
        f"(dequantized twin in {args.outdir}/dequantized)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
