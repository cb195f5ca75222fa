"""LoRA adapters for ``LLM.generate`` (vLLM's ``vllm.lora``)."""

from .request import LoRARequest

__all__ = ["LoRARequest"]
