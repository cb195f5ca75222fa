"""``LoRARequest``: which PEFT adapter a request runs with, as vLLM names it."""

import os
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class LoRARequest:
    """A PEFT LoRA adapter (a directory with ``adapter_config.json`` and
    ``adapter_model.safetensors``), e.g. ``LoRARequest("sql", 1, "/adapters/sql")``. The engine
    must run with ``enable_lora=True``. The adapter is read and checked the first time a request
    names it and then served under ``lora_name``; requests naming the same adapter share it.
    ``lora_int_id`` is vLLM's unique id of the adapter (at least 1); two requests with one name
    must give the same path."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: Optional[str] = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        self.lora_path = os.fspath(self.lora_path)
        if not self.lora_path:
            raise ValueError("lora_path must be the adapter's directory")
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
