#!/usr/bin/env python3
"""Trains a LoRA adapter with PEFT on the default model, for the training -> serving recipe.

The base is the project's default model, SmolLM2-135M-Instruct, read by transformers from the
project's Q4_1 GGUF (`scripts/fetch-default-model.sh`) and dequantized to float32, the same
weights `tpserve serve --dtype float32` runs. The behaviour taught: every answer is one line of
JSON, `{"answer": "..."}`, which the base model never writes. The data is a small synthetic chat
set (capitals, arithmetic, opposites, facts, short open questions in varied phrasings), each
rendered with the model's own chat template, so the prompt carries the default system message
the server's template adds too. Loss is on the answer tokens and the closing `<|im_end|>` only.

After training it saves the adapter with `save_pretrained` (adapter_config.json and
adapter_model.safetensors) and greedy-generates, with PEFT in float32, the answers to held-out
questions with the adapter and without it; it writes those texts beside the adapter in
`peft_greedy.json`, which `scripts/lora/demo.sh` compares with what tpserve serves.

Deterministic for a given machine and thread count: fixed seeds, deterministic algorithms, no
dropout, a fixed data order. The defaults (10 steps of 8 chats, rank 8 on all seven projections)
already teach the format; more steps make the answers' content better, not the format. On the
shared 2-core development machine (load average ~8 from other builds) loading the GGUF took
1.5-3 minutes, the 10 steps 9-20 minutes and the greedy check 7-8.5 minutes of wall time (two
runs, bit-identical adapters; 11 minutes of CPU time in all); an idle machine or a GPU is many
times faster.

    python3 -m venv /work/venv-lora && /work/venv-lora/bin/pip install -r scripts/lora/requirements.txt
    /work/venv-lora/bin/python scripts/lora/train_demo.py            # train, save, check
    /work/venv-lora/bin/python scripts/lora/train_demo.py --check    # regenerate peft_greedy.json

tests/fixtures/lora-json-answer/ is the adapter of the defaults, stored with --float16 (its
peft_greedy.json made by `--check --float16` on the float32 adapter), which CI serves with
`scripts/lora/demo.sh --adapter tests/fixtures/lora-json-answer` (no torch needed there).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(os.environ.get("TPSERVE_CACHE_DIR") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tpserve"),
    "lora", "smollm2-json-answer")
GREEDY_FILE = "peft_greedy.json"
# SmolLM2-Instruct's end of turn, `<|im_end|>`: generation stops there, as the server's does.
EOS_TEXT = "<|im_end|>"

# Held out: no question below is in the training set (nor any of these countries, pairs or facts).
HELD_OUT = [
    "What is the capital of Italy?",
    "What is 9 plus 6?",
    "What is the opposite of early?",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
    "What color is a banana?",
    "Name a large animal that lives in the ocean.",
    "Why do we need sleep?",
]

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Norway", "Oslo"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Australia", "Canberra"), ("Ireland", "Dublin"),
    ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Thailand", "Bangkok"),
    ("Austria", "Vienna"), ("Cuba", "Havana"), ("Chile", "Santiago"),
]
CAPITAL_QUESTIONS = [
    "What is the capital of {}?", "Which city is the capital of {}?",
    "Tell me the capital of {}.", "What's the capital city of {}?",
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("happy", "sad"), ("fast", "slow"),
    ("light", "dark"), ("open", "closed"), ("old", "new"), ("wet", "dry"), ("hard", "soft"),
    ("full", "empty"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"),
    ("long", "short"), ("heavy", "light"),
]
OPPOSITE_QUESTIONS = [
    "What is the opposite of {}?", "Give me the opposite of the word \"{}\".",
    "What word means the opposite of {}?",
]
FACTS = [
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("How many days are in a week?", "Seven"),
    ("What do bees make?", "Honey"),
    ("What gas do plants take in from the air?", "Carbon dioxide"),
    ("How many continents are there?", "Seven"),
    ("What is the freezing point of water in Celsius?", "0 degrees Celsius"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical symbol for gold?", "Au"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("How many hours are in a day?", "24"),
    ("What is the tallest mountain on Earth?", "Mount Everest"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("How many sides does a triangle have?", "Three"),
    ("What is the longest river in Africa?", "The Nile"),
    ("Which animal is known as the king of the jungle?", "The lion"),
    ("What do cows drink?", "Water"),
    ("What color is grass?", "Green"),
    ("How many wheels does a bicycle have?", "Two"),
    ("What is the boiling point of water in Celsius?", "100 degrees Celsius"),
    ("Which is the closest star to Earth?", "The Sun"),
    ("What do you call a baby cat?", "A kitten"),
    ("What is H2O?", "Water"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("What is the main ingredient of bread?", "Flour"),
]
OPEN = [
    ("Tell me about dogs.", "Dogs are loyal animals that have lived with people for thousands of years."),
    ("Can you give me a tip for studying?", "Study in short sessions and take regular breaks."),
    ("Write a short greeting for a friend.", "Hello friend, I hope you are having a wonderful day!"),
    ("Describe the ocean in one sentence.", "The ocean is a vast body of salt water that covers most of the Earth."),
    ("Why is exercise good for you?", "Exercise strengthens the heart and muscles and improves mood."),
    ("What should I eat for breakfast?", "Oatmeal with fruit is a healthy breakfast."),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag and let it steep for three minutes."),
    ("Explain what a computer is.", "A computer is a machine that stores and processes information."),
    ("Give me a fun fact.", "Octopuses have three hearts."),
    ("What is a good name for a cat?", "Whiskers"),
    ("Hi!", "Hello! How can I help you today?"),
    ("Thank you for your help.", "You are welcome!"),
    ("Suggest a hobby.", "Gardening is a relaxing hobby."),
    ("What is the weather like in summer?", "Summer is usually warm and sunny."),
    ("How can I save money?", "Make a budget and spend less than you earn."),
    ("What is love?", "Love is a deep feeling of care and affection for someone."),
]


def build_dataset(seed):
    """The synthetic (question, answer) pairs, shuffled with `seed`."""
    rng = random.Random(seed)
    pairs = []
    for i, (country, capital) in enumerate(CAPITALS):
        pairs.append((CAPITAL_QUESTIONS[i % len(CAPITAL_QUESTIONS)].format(country), capital))
    for i, (word, opposite) in enumerate(OPPOSITES):
        pairs.append((OPPOSITE_QUESTIONS[i % len(OPPOSITE_QUESTIONS)].format(word), opposite))
    for _ in range(24):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        op = rng.choice(["plus", "times", "minus"])
        value = {"plus": a + b, "times": a * b, "minus": a - b}[op]
        phrasing = rng.choice(["What is {} {} {}?", "Calculate {} {} {}.", "How much is {} {} {}?"])
        pairs.append((phrasing.format(a, op, b), str(value)))
    pairs += FACTS + OPEN
    held = set(HELD_OUT)
    assert not any(q in held for q, _ in pairs), "a held-out question is in the training set"
    rng.shuffle(pairs)
    return pairs


def answer_text(answer):
    """The taught format: one line of JSON."""
    return json.dumps({"answer": answer})


def default_gguf():
    out = subprocess.run([os.path.join(REPO, "scripts", "fetch-default-model.sh")], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def load_base(gguf):
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="eager")
    # The weights are dequantized float32 now: drop the GGUF "quantizer" so PEFT treats the
    # model as a plain float32 one (and save_pretrained does not describe a quantized base).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return tok, model


def prompt_ids(tok, question):
    """The chat prompt as the server renders it (the template adds its default system message)."""
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def encode(tok, question, answer, eos_id):
    """`(input_ids, labels)`: labels are -100 except on the answer and its `<|im_end|>`."""
    prompt = prompt_ids(tok, question)
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
    assert full[:len(prompt)] == prompt, f"the prompt does not prefix the full chat: {question!r}"
    end = full.index(eos_id, len(prompt)) + 1  # through the answer's <|im_end|>
    ids = full[:end]
    return ids, [-100] * len(prompt) + ids[len(prompt):]


def batches(examples, batch_size, pad_id):
    """Right-padded batches in order (attention mask 0 and label -100 on padding)."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (x, y) in enumerate(chunk):
            ids[row, :len(x)] = torch.tensor(x)
            labels[row, :len(y)] = torch.tensor(y)
            mask[row, :len(x)] = 1
        yield ids, mask, labels


def train(args, tok, model):
    eos_id = tok.convert_tokens_to_ids(EOS_TEXT)
    pairs = build_dataset(args.seed)
    examples = [encode(tok, q, answer_text(a), eos_id) for q, a in pairs]
    print(f"dataset: {len(examples)} chats, {sum(len(x) for x, _ in examples)} tokens, "
          f"{sum(sum(1 for t in y if t != -100) for _, y in examples)} of them trained on "
          f"(e.g. {pairs[0][0]!r} -> {answer_text(pairs[0][1])})")

    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                        target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA r={args.rank} alpha={args.alpha} on {args.targets}: "
          f"{trainable:,} trainable parameters")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, (args.steps - s) / max(1, args.steps - warmup)))

    model.train()
    rng = random.Random(args.seed)
    order = []
    losses = []
    started = time.time()
    for step in range(args.steps):
        if not order:
            shuffled = examples[:]
            rng.shuffle(shuffled)
            order = list(batches(shuffled, args.batch_size, eos_id))
        ids, mask, labels = order.pop(0)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            recent = losses[-10:]
            print(f"step {step + 1:4d}/{args.steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{time.time() - started:6.1f} s", flush=True)
    seconds = time.time() - started
    final = sum(losses[-10:]) / len(losses[-10:])
    print(f"trained {args.steps} steps in {seconds:.1f} s; first loss {losses[0]:.4f}, "
          f"final loss (mean of the last 10 steps) {final:.4f}")
    return model, {"steps": args.steps, "seconds": round(seconds, 1),
                   "first_loss": round(losses[0], 4), "final_loss": round(final, 4),
                   "examples": len(examples), "rank": args.rank, "alpha": args.alpha,
                   "targets": args.targets.split(","), "lr": args.lr,
                   "batch_size": args.batch_size, "seed": args.seed, "threads": args.threads}


@torch.no_grad()
def save_float16(model, out_dir):
    """Rounds the adapter's weights to float16 in `model` and rewrites the saved file in float16
    (half the bytes), so the greedy check that follows runs on exactly the weights served."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(p.half().float())
    path = os.path.join(out_dir, "adapter_model.safetensors")
    tensors = {k: v.half().contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    print(f"rewrote {path} in float16")


@torch.no_grad()
def greedy(model, tok, question, max_new_tokens):
    """Greedy answer, token by token with the KV cache, stopping at `<|im_end|>`."""
    eos_id = tok.convert_tokens_to_ids(EOS_TEXT)
    ids = torch.tensor([prompt_ids(tok, question)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=eos_id)
    new = out[0, ids.shape[1]:].tolist()
    finish = "stop" if new and new[-1] == eos_id else "length"
    if finish == "stop":
        new = new[:-1]
    return {"text": tok.decode(new), "token_ids": new, "finish_reason": finish}


def check(model, tok, out_dir, gguf, max_new_tokens, training):
    model.eval()
    started = time.time()
    rows = []
    for q in HELD_OUT:
        adapter = greedy(model, tok, q, max_new_tokens)
        with model.disable_adapter():
            base = greedy(model, tok, q, max_new_tokens)
        rows.append({"question": q, "adapter": adapter, "base": base})
        print(f"\n{q}\n  adapter: {adapter['text']!r}\n  base:    {base['text']!r}", flush=True)
    result = {
        "note": "greedy answers of transformers + PEFT in float32 (eager attention) on the GGUF "
                "dequantized to float32, with the adapter and without it (the base); written by "
                "scripts/lora/train_demo.py",
        "gguf": gguf,
        "max_tokens": max_new_tokens,
        "training": training,
        "prompts": rows,
    }
    path = os.path.join(out_dir, GREEDY_FILE)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"\nwrote {path} ({time.time() - started:.1f} s of greedy decoding)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    ap.add_argument("--alpha", type=float, default=16.0, help="lora_alpha (default 16)")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    help="comma-separated target modules (default: all seven projections)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8),
                    help="torch CPU threads (results depend on it; default min(cores, 8))")
    ap.add_argument("--max-new-tokens", type=int, default=24,
                    help="greedy answer length for the held-out check (default 24)")
    ap.add_argument("--gguf", help="base model GGUF (default: scripts/fetch-default-model.sh)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"adapter directory (default {DEFAULT_OUT})")
    ap.add_argument("--float16", action="store_true",
                    help="store the adapter in float16 (rounded before the greedy check)")
    ap.add_argument("--check", action="store_true",
                    help="skip training: load the adapter in --out and only write peft_greedy.json")
    args = ap.parse_args()
    if args.steps < 1 or args.rank < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        ap.error("--steps, --rank, --batch-size and --max-new-tokens must be at least 1")

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    gguf = args.gguf or default_gguf()
    t0 = time.time()
    tok, model = load_base(gguf)
    print(f"loaded {gguf} as float32 in {time.time() - t0:.1f} s")

    if args.check:
        model = PeftModel.from_pretrained(model, args.out)
        if args.float16:
            save_float16(model, args.out)
        training = None
        previous = os.path.join(args.out, GREEDY_FILE)
        if os.path.exists(previous):
            with open(previous) as f:
                training = json.load(f).get("training")
        check(model, tok, args.out, gguf, args.max_new_tokens, training)
        return
    model, training = train(args, tok, model)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    if args.float16:
        save_float16(model, args.out)
    print(f"saved the adapter to {args.out}: {sorted(os.listdir(args.out))}")
    check(model, tok, args.out, gguf, args.max_new_tokens, training)


if __name__ == "__main__":
    sys.exit(main())
