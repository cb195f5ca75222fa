"""What make_fp8_checkpoint.py and make_int4_checkpoint.py share: which tensors are linear
weights, and writing a quantized checkpoint beside its dequantized float32 twin.

A pair is OUTDIR (the quantized weights, config.json with the method's `quantization_config`)
and OUTDIR/dequantized (the same weights dequantized, in float32, config.json without it), both
with the random checkpoint's tokenizer.json and prompts.json, so that tpserve runs the first and
transformers the second (tests/gpu/run.sh's step_fp8_checkpoint and step_int4_checkpoint).
"""

import json
import os
import shutil

from safetensors.torch import save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def twin_dir(outdir: str) -> str:
    """The dequantized twin's directory (created)."""
    path = os.path.join(outdir, "dequantized")
    os.makedirs(path, exist_ok=True)
    return path


def write_pair(ckpt: str, outdir: str, quantized: dict, dequantized: dict,
               quantization_config: dict) -> None:
    """Saves `quantized` in OUTDIR and `dequantized` in its twin, with their config.json files
    (from CKPT's, without any quantization_config for the twin) and CKPT's tokenizer and prompts."""
    deq_dir = twin_dir(outdir)
    save_file({k: v.cpu() for k, v in quantized.items()}, os.path.join(outdir, "model.safetensors"))
    save_file({k: v.cpu() for k, v in dequantized.items()},
              os.path.join(deq_dir, "model.safetensors"))
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(os.path.join(deq_dir, "config.json"), "w") as f:
        json.dump(dict(config, torch_dtype="float32"), f, indent=2)
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(dict(config, quantization_config=quantization_config), f, indent=2)
    for extra in ("tokenizer.json", "prompts.json"):
        for out in (outdir, deq_dir):
            shutil.copy(os.path.join(ckpt, extra), os.path.join(out, extra))
