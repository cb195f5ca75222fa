#!/usr/bin/env python3
"""Writes a Llama-3.1-8B-shaped model directory for benchmarks with `--load-format dummy`.

What: OUTDIR/config.json is tests/gpu/llama3-8b-config.json (Llama-3-8B's shape) with Llama 3.1's
131,072 positions, so an 8,192-token prompt fits; OUTDIR/tokenizer.json is a word-level tokenizer
whose vocabulary is every word `tpserve bench serve` draws its random prompts from (read from
coordinator/src/bench/serve.rs), then filler tokens up to the model's 128,256 ids, so a prompt of
N words is N tokens and every id the random weights sample decodes to text.

Why: the GPU machine has no network; the weights are random (`--load-format dummy`), but the
server still needs a tokenizer, and the benchmark's "1,024 in" must mean 1,024 tokens.

How: make_bench_model.py OUTDIR
"""

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_words() -> list[str]:
    text = open(os.path.join(ROOT, "coordinator/src/bench/serve.rs")).read()
    block = re.search(r"const WORDS: &\[&str\] = &\[(.*?)\];", text, re.S)
    if not block:
        sys.exit("make_bench_model.py: no WORDS list in coordinator/src/bench/serve.rs")
    return re.findall(r'"([^"]+)"', block.group(1))


def main() -> int:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    config = json.load(open(os.path.join(ROOT, "tests/gpu/llama3-8b-config.json")))
    config["max_position_embeddings"] = 131072
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = list(dict.fromkeys(bench_words()))
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<unk>"]
    vocab = {}
    for token in specials + words:
        vocab.setdefault(token, len(vocab))
    filler = 0
    while len(vocab) < config["vocab_size"]:
        vocab[f"w{filler}"] = len(vocab)
        filler += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(specials)
    tok.save(os.path.join(out, "tokenizer.json"))
    sample = " ".join(words[:5])
    ids = tok.encode(sample).ids
    assert len(ids) == 5 and tok.decode(ids) == sample, (ids, tok.decode(ids))
    print(f"make_bench_model.py: {out}: {len(words)} bench words, vocabulary {len(vocab)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
