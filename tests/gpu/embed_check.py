#!/usr/bin/env python3
"""Checks /v1/embeddings on the GPU against Hugging Face transformers' hidden states.

What: starts `tpserve serve --task embed --device cuda --dtype bfloat16` on the random checkpoint
(make_checkpoint.py) at --tp ranks, sends the checkpoint's prompts (token ids taken modulo 256:
the API accepts only ids its byte-level tokenizer has; the 1500-token one is prefilled in chunks) as one batched request and again one at a time, and compares each vector
with transformers' `AutoModel` (the decoder without its LM head) in float32: the last token's
`last_hidden_state` (after the final RMSNorm), L2-normalized. Writes the cosines to --out as
JSON. Exit status 0 when every vector's cosine with the reference is >= --min-cosine (bf16
against f32) and the batched and one-at-a-time vectors agree to the same bound, 1 otherwise.

Why: issue 13 (item 5) on the CUDA backend: an embedding step runs the layers, stops after the
final norm (`forward::hidden_states`), and copies the normed states back; this is its only check
on a GPU.

How: embed_check.py --bin BIN_DIR --model DIR --out OUT.json [--tp 1] [--min-cosine 0.999]
     [--device cuda] [--ref-device cuda]
"""

import argparse
import json
import math
import sys

import server as srv


def cosine(a: list, b: list) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def reference(model: str, prompts: list, device: str) -> list:
    import torch
    from transformers import AutoModel

    m = AutoModel.from_pretrained(model, torch_dtype=torch.float32).to(device).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            h = m(torch.tensor([ids], device=device)).last_hidden_state[0, -1]
            out.append(torch.nn.functional.normalize(h, dim=0).tolist())
    return out


def ours(bin_dir: str, model: str, tp: int, device: str, log_path: str, prompts: list) -> tuple:
    args = ["--model", model, "--task", "embed", "--device", device,
            "--tensor-parallel-size", str(tp), "--max-num-batched-tokens", "512",
            "--served-model-name", "m"]
    if device != "cpu":
        args += ["--dtype", "bfloat16"]
    server, base, log = srv.start(bin_dir, args, log_path)
    try:
        if srv.wait_healthy(server, base) is None:
            raise RuntimeError(f"the server did not come up (see {log_path})")
        status, answer = srv.post(base + "/v1/embeddings", {"model": "m", "input": prompts})
        if status != 200:
            raise RuntimeError(f"batched: status {status}: {answer}")
        batched = [d["embedding"] for d in sorted(answer["data"], key=lambda d: d["index"])]
        alone = []
        for ids in prompts:
            status, answer = srv.post(base + "/v1/embeddings", {"model": "m", "input": [ids]})
            if status != 200:
                raise RuntimeError(f"alone: status {status}: {answer}")
            alone.append(answer["data"][0]["embedding"])
    finally:
        srv.stop(server, log)
    return batched, alone


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--min-cosine", type=float, default=0.999)
    ap.add_argument("--device", default="cuda", help="tpserve's device (cpu only to test this script)")
    ap.add_argument("--ref-device", default="cuda")
    args = ap.parse_args()
    with open(f"{args.model}/prompts.json") as f:
        prompts = [[t % 256 for t in p] for p in json.load(f)["prompts"]]
    try:
        batched, alone = ours(args.bin, args.model, args.tp, args.device,
                              args.out + ".server.log", prompts)
    except RuntimeError as e:
        print(f"embed_check FAIL {e}")
        return 1
    want = reference(args.model, prompts, args.ref_device)
    vs_hf = [cosine(g, w) for g, w in zip(batched, want)]
    vs_alone = [cosine(b, a) for b, a in zip(batched, alone)]
    result = {"tp": args.tp, "prompt_lengths": [len(p) for p in prompts],
              "cosine_vs_transformers": vs_hf, "cosine_batched_vs_alone": vs_alone,
              "min_cosine": args.min_cosine}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    ok = min(vs_hf) >= args.min_cosine and min(vs_alone) >= args.min_cosine
    print(f"embed_check tp{args.tp}: min cosine vs transformers {min(vs_hf):.6f}, "
          f"batched vs alone {min(vs_alone):.6f} over {len(prompts)} prompts")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
