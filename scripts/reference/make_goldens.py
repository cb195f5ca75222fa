#!/usr/bin/env python3
"""Regenerate tpserve's numerical reference (golden values) with Hugging Face transformers.

Run from anywhere (paths are resolved relative to this file), on CPU, with the pinned tools:

    python3 -m pip install -r scripts/reference/requirements.txt
    python3 scripts/reference/make_goldens.py            # everything
    python3 scripts/reference/make_goldens.py --skip-smollm2   # tiny models only (no GGUF needed)

It is deterministic (fixed seeds, float32, eager attention, greedy decoding) and writes:

  tests/fixtures/tiny-llama/            config.json + model.safetensors (float32), random weights:
                                        LlamaForCausalLM, hidden 64, 2 layers, 4 heads / 2 KV heads
                                        (GQA), head_dim 16, vocab 256, untied lm_head, llama3 rope
                                        scaling (factor 8, original_max_position_embeddings 64).
  tests/fixtures/tiny-llama-sharded/    the same weights in 3 safetensors shards +
                                        model.safetensors.index.json (same config.json).
  tests/fixtures/tiny-qwen2/            Qwen2ForCausalLM, q/k/v biases (random, non-zero), tied
                                        embeddings, rope_theta 1e6, rms_norm_eps 1e-6, GQA 4/2.
  tests/fixtures/goldens/tiny-llama.json, tiny-qwen2.json
                                        full float32 logits at every position for 3 fixed token
                                        sequences (lengths 7, 33, 100), and a greedy continuation
                                        of 16 tokens for the first (EOS disabled: always 16 tokens).
                                        Values are the exact float32 numbers (shortest decimal that
                                        round-trips to the same f32).
  tests/fixtures/goldens/smollm2.json   SmolLM2-135M-Instruct loaded by transformers from the
                                        project's default GGUF (Q4_1, dequantized to float32 by
                                        transformers; q/k permutation undone by transformers):
                                        tokenizer ids for varied strings, chat-template renderings
                                        and their ids, last-position full logits + per-position
                                        top-5 for 2 prompts (values rounded to 6 significant
                                        digits), greedy generations (<= 32 new tokens, EOS
                                        <|im_end|> = 2) for the 2 chat prompts.

The GGUF path comes from scripts/fetch-default-model.sh (cached under ~/.cache/tpserve/models).
As a side effect the HF-converted SmolLM2 (float32 model.safetensors + config.json + tokenizer
files) is saved to ~/.cache/tpserve/models/SmolLM2-135M-Instruct-hf/ for local cross-checks
(model files are never committed to the repository).

config.json files of the tiny fixtures are written in the classic layout used by checkpoints on
the Hugging Face Hub (top-level "rope_theta", "rope_scaling" with "rope_type", "torch_dtype"):
transformers >= 5 would otherwise write a "rope_parameters" object instead. The script reloads
each fixture from disk with transformers and checks that the reloaded model reproduces the
in-memory model's logits bit for bit before computing the goldens from it.
"""

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
GOLDENS = os.path.join(FIXTURES, "goldens")
HF_CACHE_DIR = os.path.expanduser("~/.cache/tpserve/models/SmolLM2-135M-Instruct-hf")

TINY_GREEDY_NEW_TOKENS = 16
SMOL_MAX_NEW_TOKENS = 32
SMOL_EOS = 2  # <|im_end|>


# ----------------------------------------------------------------------------------------------
# helpers


def versions():
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def f32_list(t):
    """Exact float32 values as shortest round-trip decimal strings (emitted as JSON numbers)."""
    a = t.detach().to(torch.float32).contiguous().numpy().reshape(-1)
    return [RawNum(np.format_float_positional(x, unique=True, trim="-")) if math.isfinite(x)
            else float(x) for x in a]


def g6_list(t):
    """Values rounded to 6 significant digits."""
    a = t.detach().to(torch.float64).contiguous().numpy().reshape(-1)
    return [RawNum("%.6g" % x) for x in a]


class RawNum(str):
    """A number already formatted as a JSON number literal."""


def dumps(obj):
    """Compact JSON; RawNum strings are written unquoted."""
    if isinstance(obj, RawNum):
        s = str(obj)
        float(s)  # sanity
        return s
    if isinstance(obj, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + dumps(v) for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in obj) + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = dumps(obj)
    json.loads(text)  # validate
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.relpath(path, REPO)} ({os.path.getsize(path)} bytes)")


def classic_config(path, rope_scaling):
    """Rewrite a transformers-5 config.json in the classic Hub layout (rope_theta/rope_scaling)."""
    with open(path) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["rope_scaling"] = rope_scaling
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg = dict(sorted(cfg.items()))
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


@torch.no_grad()
def logits_of(model, ids):
    return model(torch.tensor([ids]), use_cache=False).logits[0].float()


@torch.no_grad()
def manual_greedy(model, ids, n, eos=None):
    """Greedy decoding by full recomputation (no KV cache); returns ids and top1-top2 margins."""
    seq = list(ids)
    out, margins = [], []
    for _ in range(n):
        last = logits_of(model, seq)[-1]
        top = torch.topk(last, 2)
        tok = int(top.indices[0])
        margins.append(float(top.values[0] - top.values[1]))
        out.append(tok)
        seq.append(tok)
        if eos is not None and tok == eos:
            break
    return out, margins


@torch.no_grad()
def hf_generate(model, ids, n, eos):
    inp = torch.tensor([ids])
    out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False,
                         max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


# ----------------------------------------------------------------------------------------------
# tiny random models


def randomize(model, seed, embed_std=0.5, linear_std=0.1, bias_std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))  # U(0.5, 1.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * bias_std)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * embed_std)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * linear_std)


def tiny_sequences(seed, vocab):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 33, 100)]


def make_tiny(name, model_cls, config, rope_scaling, seed, init, sharded_dir=None):
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize(model, seed, **init)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out_dir = os.path.join(FIXTURES, name)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, f))
    model.save_pretrained(out_dir)
    for f in os.listdir(out_dir):  # keep only config.json + weights
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(out_dir, f))
        else:
            os.chmod(os.path.join(out_dir, f), 0o644)
    classic_config(os.path.join(out_dir, "config.json"), rope_scaling)

    seqs = tiny_sequences(seed + 1000, config.vocab_size)

    # Reload from disk (classic config) and check it is the same model.
    reloaded = model_cls.from_pretrained(out_dir, dtype=torch.float32,
                                         attn_implementation="eager").eval()
    assert reloaded.config.rope_parameters == model.config.rope_parameters, (
        reloaded.config.rope_parameters, model.config.rope_parameters)
    for s in seqs:
        assert torch.equal(logits_of(model, s), logits_of(reloaded, s)), "reload mismatch"

    if sharded_dir is not None:
        sd = os.path.join(FIXTURES, sharded_dir)
        os.makedirs(sd, exist_ok=True)
        for f in os.listdir(sd):
            os.remove(os.path.join(sd, f))
        model.save_pretrained(sd, max_shard_size="200KB")
        for f in os.listdir(sd):
            if not (f == "config.json" or f.endswith(".safetensors") or f.endswith(".index.json")):
                os.remove(os.path.join(sd, f))
            else:
                os.chmod(os.path.join(sd, f), 0o644)
        classic_config(os.path.join(sd, "config.json"), rope_scaling)
        shards = [f for f in os.listdir(sd) if f.endswith(".safetensors")]
        assert len(shards) >= 2 and os.path.exists(
            os.path.join(sd, "model.safetensors.index.json")), os.listdir(sd)
        rs = model_cls.from_pretrained(sd, dtype=torch.float32, attn_implementation="eager").eval()
        for s in seqs:
            assert torch.equal(logits_of(model, s), logits_of(rs, s)), "sharded reload mismatch"
        print(f"{sharded_dir}: {sorted(os.listdir(sd))}")

    model = reloaded
    model.generation_config.eos_token_id = None
    entries = []
    for s in seqs:
        lg = logits_of(model, s)
        entries.append({"input_ids": s, "shape": list(lg.shape), "logits": f32_list(lg)})

    # Run-to-run / thread-count noise and float32-vs-float64 error, for choosing tolerances.
    noise = measure_noise(model, seqs)

    greedy, margins = manual_greedy(model, seqs[0], TINY_GREEDY_NEW_TOKENS)
    gen = hf_generate(model, seqs[0], TINY_GREEDY_NEW_TOKENS, eos=None)
    assert gen == greedy, (gen, greedy)

    golden = {
        "model": name,
        "fixture_dir": f"tests/fixtures/{name}",
        "description": "random-weight model; logits [seq_len, vocab] row-major, exact float32",
        "versions": versions(),
        "settings": {"dtype": "float32", "attn_implementation": "eager", "device": "cpu",
                     "seed": seed, "init": init},
        "sequences": entries,
        "greedy": {"input_ids": seqs[0], "max_new_tokens": TINY_GREEDY_NEW_TOKENS,
                   "eos_token_id": None, "new_ids": greedy,
                   "top1_minus_top2_logit": [round(m, 6) for m in margins]},
        "noise": noise,
    }
    write_json(os.path.join(GOLDENS, f"{name}.json"), golden)
    lg = logits_of(model, seqs[2])
    print(f"{name}: logits std {lg.std():.3f} min {lg.min():.3f} max {lg.max():.3f}; "
          f"greedy {greedy} min margin {min(margins):.4f}; noise {noise}")


def rel_err(a, b):
    """max |a - b| / max(1, |b|)"""
    return float(((a - b).abs() / b.abs().clamp(min=1.0)).max())


@torch.no_grad()
def measure_noise(model, seqs):
    threads = torch.get_num_threads()
    base = [logits_of(model, s) for s in seqs]
    again = [logits_of(model, s) for s in seqs]
    torch.set_num_threads(1)
    one = [logits_of(model, s) for s in seqs]
    torch.set_num_threads(threads)
    model.set_attn_implementation("sdpa")
    sdpa = [logits_of(model, s) for s in seqs]
    model.set_attn_implementation("eager")
    m64 = model.to(torch.float64)
    f64 = [m64(torch.tensor([s]), use_cache=False).logits[0] for s in seqs]
    model.to(torch.float32)
    return {
        "same_run_repeat_max_rel": max(rel_err(a, b) for a, b in zip(again, base)),
        "threads_1_vs_default_max_rel": max(rel_err(a, b) for a, b in zip(one, base)),
        "sdpa_vs_eager_max_rel": max(rel_err(a, b) for a, b in zip(sdpa, base)),
        "f32_vs_f64_max_rel": max(rel_err(a.double(), b) for a, b in zip(base, f64)),
        "f32_vs_f64_max_abs": max(float((a.double() - b).abs().max()) for a, b in zip(base, f64)),
        "metric": "max over logits of |x - ref| / max(1, |ref|)",
    }


def tiny_models():
    llama3_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    llama_cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_theta": 10000.0, **llama3_scaling},
        attn_implementation="eager", dtype="float32",
    )
    make_tiny("tiny-llama", LlamaForCausalLM, llama_cfg, llama3_scaling, seed=1234,
              init=dict(embed_std=0.5, linear_std=0.1), sharded_dir="tiny-llama-sharded")

    qwen_cfg = Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
        use_sliding_window=False, attn_implementation="eager", dtype="float32",
    )
    # Tied embeddings: a smaller embedding std and larger projections avoid a model that just
    # repeats its input token.
    make_tiny("tiny-qwen2", Qwen2ForCausalLM, qwen_cfg, None, seed=5678,
              init=dict(embed_std=0.3, linear_std=0.25, bias_std=0.5))


# ----------------------------------------------------------------------------------------------
# SmolLM2 from the default GGUF

TOKENIZER_STRINGS = [
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "12345 6789",
    "Hello, world! (a) [b] {c}; x=1+2*3/4 -- \"quoted\" 'single' ... ?!",
    "héllo wörld 🦀",
    "   leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\ttabbed\r\nend\n",
    "<|im_start|>user\nHi<|im_end|>\n",
    "",
]

CHATS = {
    "user_only": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is the capital of France?"}],
}

PLAIN_PROMPT = ("The Eiffel Tower is one of the most famous landmarks in Paris, and it was "
                "built for the")


def gguf_path():
    return subprocess.run([os.path.join(REPO, "scripts", "fetch-default-model.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]


@torch.no_grad()
def smollm2():
    path = gguf_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="eager").eval()

    # Save the HF conversion for local cross-checks (outside the repo).
    os.makedirs(HF_CACHE_DIR, exist_ok=True)
    # The weights are already dequantized float32; drop the GGUF "quantizer" so that
    # save_pretrained writes a plain float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(HF_CACHE_DIR)
    classic_config(os.path.join(HF_CACHE_DIR, "config.json"), None)
    tok.save_pretrained(HF_CACHE_DIR)
    hf = AutoModelForCausalLM.from_pretrained(HF_CACHE_DIR, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    probe = tok(PLAIN_PROMPT).input_ids
    assert torch.equal(logits_of(model, probe), logits_of(hf, probe)), "HF dir reload mismatch"
    del hf
    print(f"saved HF conversion to {HF_CACHE_DIR}: {sorted(os.listdir(HF_CACHE_DIR))}")

    tokenizer = []
    for s in TOKENIZER_STRINGS:
        ids = tok(s, add_special_tokens=True).input_ids
        ids_plain = tok(s, add_special_tokens=False).input_ids
        assert ids == ids_plain, "add_special_tokens unexpectedly adds tokens"
        tokenizer.append({"text": s, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
                          "decoded": tok.decode(ids)})

    chat = {}
    for key, msgs in CHATS.items():
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=True).input_ids
        chat[key] = {"messages": msgs, "add_generation_prompt": True, "text": text, "ids": ids}

    prompts = {"chat_user_only": chat["user_only"]["ids"],
               "plain": tok(PLAIN_PROMPT).input_ids}
    logits = {}
    noise = measure_noise(model, list(prompts.values()))
    for key, ids in prompts.items():
        lg = logits_of(model, ids)
        top = torch.topk(lg, 5, dim=-1)
        logits[key] = {
            "text": PLAIN_PROMPT if key == "plain" else chat["user_only"]["text"],
            "input_ids": ids,
            "last_logits": g6_list(lg[-1]),
            "top5": [[[int(i), RawNum("%.6g" % float(v))] for i, v in zip(ix, vs)]
                     for ix, vs in zip(top.indices, top.values)],
        }

    generations = {}
    for key in CHATS:
        ids = chat[key]["ids"]
        gen = hf_generate(model, ids, SMOL_MAX_NEW_TOKENS, eos=SMOL_EOS)
        manual, margins = manual_greedy(model, ids, SMOL_MAX_NEW_TOKENS, eos=SMOL_EOS)
        assert gen == manual, (gen, manual)
        generations[key] = {"input_ids": ids, "max_new_tokens": SMOL_MAX_NEW_TOKENS,
                            "eos_token_id": SMOL_EOS, "new_ids": gen,
                            "text": tok.decode(gen, skip_special_tokens=True),
                            "text_with_special": tok.decode(gen),
                            "top1_minus_top2_logit": [round(m, 5) for m in margins]}
        print(f"smollm2 {key}: {gen} -> {tok.decode(gen)!r} (min margin {min(margins):.3f})")

    golden = {
        "model": "SmolLM2-135M-Instruct",
        "source": f"{f} (dequantized to float32 by transformers' GGUF loader)",
        "versions": versions(),
        "settings": {"dtype": "float32", "attn_implementation": "eager", "device": "cpu"},
        "rounding": "logit values rounded to 6 significant digits (%.6g)",
        "config": {k: v for k, v in model.config.to_dict().items()
                   if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "num_key_value_heads", "head_dim",
                            "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
                            "max_position_embeddings", "bos_token_id", "eos_token_id",
                            "pad_token_id")},
        "special_tokens": {"bos": tok.bos_token, "bos_id": tok.bos_token_id,
                           "eos": tok.eos_token, "eos_id": tok.eos_token_id,
                           "unk": tok.unk_token, "unk_id": tok.unk_token_id,
                           "pad": tok.pad_token, "pad_id": tok.pad_token_id,
                           "add_bos_token": bool(getattr(tok, "add_bos_token", False))},
        "tokenizer_backend": {k: v for k, v in json.loads(tok.backend_tokenizer.to_str()).items()
                              if k in ("normalizer", "pre_tokenizer", "post_processor",
                                       "decoder")},
        "tokenizer_notes": (
            "transformers builds a plain byte-level BPE from the GGUF (tokenizer.ggml.model "
            "'gpt2', tokenizer.ggml.pre 'smollm'): GPT-2 regex, no separate digit splitter, "
            "add_bos_token false, so encoding adds no special tokens. The vocabulary has no "
            "multi-character token containing an ASCII digit, so digits come out one per token "
            "either way."),
        "tokenizer": tokenizer,
        "chat_template": tok.chat_template,
        "chat": chat,
        "logits": logits,
        "generation": generations,
        "noise": noise,
    }
    write_json(os.path.join(GOLDENS, "smollm2.json"), golden)
    print(f"smollm2 noise: {noise}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-smollm2", action="store_true", help="only the tiny random models")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    tiny_models()
    if not args.skip_smollm2:
        smollm2()


if __name__ == "__main__":
    main()
