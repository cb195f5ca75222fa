#!/usr/bin/env python3
"""Writes the small random Llama checkpoint and the prompts of the GPU numerical checks.

What: OUTDIR/{config.json, model.safetensors} (a LlamaForCausalLM in bfloat16, saved by
transformers' save_pretrained), OUTDIR/tokenizer.json (a byte-level tokenizer of 256 byte tokens,
no merges, so `tpserve serve` can take text for this model) and OUTDIR/prompts.json ({"prompts": [[ids], ...]}: 4 prompts of
random token ids, lengths 5, 64, 333 and 1500).

Why: the GPU machine has no network, so the numerical checks of the CUDA backend (tests/gpu/run.sh)
compare tpserve and Hugging Face transformers on the same random weights, written there.

Shape: hidden 1024, 4 layers, 8 heads, 2 KV heads (GQA, head_dim 128), intermediate 2816, vocab
32000, llama3 rope scaling (theta 500000, factor 8, low 1, high 4, original 8192), untied
embeddings, rms_norm_eps 1e-5. The rope settings go into `rope_parameters` (transformers 5's
place; tpserve reads both that and `rope_scaling`). transformers warns that
original_max_position_embeddings (8192) is not below max_position_embeddings (4096); the
warning is harmless: the scaling formula only uses the four numbers, and this shape keeps the
low-frequency bands (wavelength > 2048) scaled, which the 1500-token prompt exercises.

Weights (all from one seeded generator, on --device): every Linear and the embedding are
normal(0, 0.02) (transformers' initializer_range), then, so that the test can see mistakes:
  - lm_head x4: logits get a spread of a few units (std ~2.5 instead of ~0.6), so top-1/KL
    figures mean something and bf16 rounding errors are small next to the spread;
  - q_proj and k_proj x2: attention scores get std ~1.6 instead of ~0.4, so attention is far
    from uniform and errors in rope (incl. llama3 scaling), positions, causal masking or GQA
    head mapping change the logits visibly;
  - every RMSNorm weight is 1 + uniform(-0.25, 0.25) (not all ones), so a norm weight that is
    dropped, mis-sharded or applied to the wrong layer shows.
The model is built in float32, initialised, then cast to bfloat16 and saved; both
implementations read the same bfloat16 numbers.

How: python3 make_checkpoint.py OUTDIR [--device cuda|cpu] [--seed 0] [--small]
--small shrinks everything (2 layers, hidden 128, vocab 512, short prompts) for testing these
scripts on a CPU-only machine; it is not used on the GPU machine.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

FULL = dict(
    hidden_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=128,
    intermediate_size=2816,
    vocab_size=32000,
    max_position_embeddings=4096,
    prompt_lengths=[5, 64, 333, 1500],
)
SMALL = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=352,
    vocab_size=512,
    max_position_embeddings=4096,
    prompt_lengths=[5, 17, 40, 96],
)

INIT_STD = 0.02
LM_HEAD_SCALE = 4.0
QK_SCALE = 2.0
NORM_JITTER = 0.25


def build_config(shape: dict) -> LlamaConfig:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    kw = {k: v for k, v in shape.items() if k != "prompt_lengths"}
    config = LlamaConfig(
        **kw,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    return config


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, device: str) -> None:
    gen = torch.Generator(device=device).manual_seed(seed)
    # Sorted names: the order (and so every number) does not depend on module registration.
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):
            u = torch.rand(p.shape, generator=gen, device=device, dtype=torch.float32)
            p.copy_(1.0 + NORM_JITTER * (2.0 * u - 1.0))
            continue
        w = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * INIT_STD
        if name == "lm_head.weight":
            w *= LM_HEAD_SCALE
        elif name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            w *= QK_SCALE
        elif not name.endswith(".weight"):
            raise SystemExit(f"unexpected parameter {name} (biases are off in this config)")
        p.copy_(w)


def write_byte_tokenizer(path: str) -> None:
    """A byte-level BPE tokenizer with the 256 byte tokens as ids 0..255 and no merges: text in,
    one token per byte, for serving the random model over HTTP (the numerical checks use ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: ord(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--device", default="cuda", help="where to initialise (default cuda)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="tiny variant for CPU-only testing")
    args = ap.parse_args()

    shape = SMALL if args.small else FULL
    torch.manual_seed(args.seed)
    config = build_config(shape)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.float32)
    init_weights(model, args.seed, args.device)
    model = model.to(torch.bfloat16).eval()

    os.makedirs(args.outdir, exist_ok=True)
    model.save_pretrained(args.outdir)
    st = os.path.join(args.outdir, "model.safetensors")
    if not os.path.exists(st):
        raise SystemExit(f"save_pretrained did not write {st}")
    # Older readers look for torch_dtype; transformers 5 writes dtype. Write both.
    cfg_path = os.path.join(args.outdir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = "bfloat16"
    cfg["dtype"] = "bfloat16"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    write_byte_tokenizer(os.path.join(args.outdir, "tokenizer.json"))

    rng = np.random.default_rng(args.seed)
    prompts = [
        rng.integers(0, shape["vocab_size"], size=n, dtype=np.int64).tolist()
        for n in shape["prompt_lengths"]
    ]
    with open(os.path.join(args.outdir, "prompts.json"), "w") as f:
        json.dump({"prompts": prompts}, f)
        f.write("\n")

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"make_checkpoint: {args.outdir}: {n_params / 1e6:.1f}M parameters (bfloat16), "
        f"prompts of lengths {shape['prompt_lengths']}, seed {args.seed}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
