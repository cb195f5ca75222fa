"""Writes a random PEFT LoRA adapter for a Llama-shaped model in pure Python (no numpy or torch
in the test environment): `adapter_config.json` and `adapter_model.safetensors`, as PEFT saves
them."""

import json
import random
import struct
import sys
from array import array
from pathlib import Path

#: SmolLM2-135M's shapes: (out, in) of each target module.
SMOLLM2 = {"layers": 30, "q_proj": (576, 576), "v_proj": (192, 576)}


def write_safetensors(path, tensors):
    """`tensors`: name -> (shape, flat list of floats), stored as little-endian f32."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        shape, values = tensors[name]
        blob = array("f", values)
        if blob.itemsize != 4:
            raise RuntimeError("array('f') is not 32-bit here")
        if sys.byteorder == "big":
            blob.byteswap()
        data = blob.tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)


def write_adapter(directory, *, rank=4, alpha=8.0, seed=1, shapes=SMOLLM2, amplitude=0.4):
    """A rank-`rank` adapter on every layer's q_proj and v_proj with random A and B (B non-zero,
    so it changes the output); returns its directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    targets = [m for m in shapes if m != "layers"]
    tensors = {}
    for layer in range(shapes["layers"]):
        for module in targets:
            out, inp = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = inp ** -0.5
            lora_a = [rng.uniform(-a, a) for _ in range(rank * inp)]
            lora_b = [rng.uniform(-amplitude, amplitude) for _ in range(out * rank)]
            tensors[f"{prefix}.lora_A.weight"] = ((rank, inp), lora_a)
            tensors[f"{prefix}.lora_B.weight"] = ((out, rank), lora_b)
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
        "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "task_type": "CAUSAL_LM", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }))
    write_safetensors(directory / "adapter_model.safetensors", tensors)
    return directory
