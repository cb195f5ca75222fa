#!/usr/bin/env python3
"""Independent check of the tiny goldens with a from-scratch NumPy forward pass (no torch).

    python3 scripts/reference/check_numpy.py

Reads tests/fixtures/{tiny-llama,tiny-llama-sharded,tiny-qwen2}/ (config.json + safetensors,
sharded via model.safetensors.index.json) using only numpy + safetensors, runs Llama/Qwen2 in
float64 and compares with tests/fixtures/goldens/tiny-*.json. This shows the fixtures hold all the
information needed to reproduce HF's logits, and doubles as a short readable spec of the
computation (rotate-half RoPE with llama3 scaling, GQA, RMSNorm, SwiGLU, tied lm_head).
"""

import json
import math
import os

import numpy as np
from safetensors.numpy import load_file

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(REPO, "tests", "fixtures")


def load_weights(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        w = {}
        for shard in sorted(set(json.load(open(idx))["weight_map"].values())):
            w.update(load_file(os.path.join(d, shard)))
        return w
    return load_file(os.path.join(d, "model.safetensors"))


def inv_freq(cfg, head_dim):
    theta = cfg["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    rs = cfg.get("rope_scaling")
    if rs is None:
        return inv
    assert rs.get("rope_type", rs.get("type")) == "llama3"
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return np.where(medium, smoothed, scaled)


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def forward(d, ids):
    cfg = json.load(open(os.path.join(d, "config.json")))
    w = {k: v.astype(np.float64) for k, v in load_weights(d).items()}
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg["rms_norm_eps"]
    T = len(ids)
    ang = np.outer(np.arange(T), inv_freq(cfg, hd))  # [T, hd/2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # x [heads, T, hd], rotate-half convention
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"], eps)
        q = lin(h, p + "self_attn.q_proj").reshape(T, H, hd).transpose(1, 0, 2)
        k = lin(h, p + "self_attn.k_proj").reshape(T, KV, hd).transpose(1, 0, 2)
        v = lin(h, p + "self_attn.v_proj").reshape(T, KV, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)  # head j uses kv head j // (H/KV)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + lin(a.transpose(1, 0, 2).reshape(T, H * hd), p + "self_attn.o_proj")
        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        g = lin(h, p + "mlp.gate_proj")
        x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight")
    if head is None:
        assert cfg["tie_word_embeddings"]
        head = w["model.embed_tokens.weight"]
    return x @ head.T


def main():
    for fixture, golden in [("tiny-llama", "tiny-llama"), ("tiny-llama-sharded", "tiny-llama"),
                            ("tiny-qwen2", "tiny-qwen2")]:
        g = json.load(open(os.path.join(FIX, "goldens", golden + ".json")))
        worst = 0.0
        for s in g["sequences"]:
            ref = np.array(s["logits"], dtype=np.float32).astype(np.float64).reshape(s["shape"])
            ours = forward(os.path.join(FIX, fixture), s["input_ids"])
            worst = max(worst, float((np.abs(ours - ref) / np.maximum(1, np.abs(ref))).max()))
        seq = list(g["greedy"]["input_ids"])
        for _ in range(g["greedy"]["max_new_tokens"]):
            seq.append(int(forward(os.path.join(FIX, fixture), seq)[-1].argmax()))
        greedy_ok = seq[len(g["greedy"]["input_ids"]):] == g["greedy"]["new_ids"]
        print(f"{fixture}: max |numpy_f64 - HF| / max(1,|HF|) = {worst:.2e}; greedy match {greedy_ok}")
        assert worst <= 1e-4 and greedy_ok


if __name__ == "__main__":
    main()
