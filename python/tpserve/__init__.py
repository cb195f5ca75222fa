"""tpserve's Python SDK: vLLM's offline API over the tpserve engine.

    from tpserve import LLM, SamplingParams
    llm = LLM(model="SmolLM2-135M-Instruct.Q4_1.gguf")
    print(llm.generate("The capital of France is", SamplingParams(temperature=0))[0].outputs[0].text)

The engine runs in this process (scheduler, KV block table, tokenizer); the model runs in
``tpserve-worker`` processes that it starts (one per tensor-parallel rank) and stops with it.
"""

from importlib.metadata import PackageNotFoundError, version

from .async_llm import AsyncLLM
from .llm import LLM
from .logprobs import Logprob
from .lora.request import LoRARequest
from .outputs import (CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, PoolingOutput,
                      PoolingRequestOutput, RequestMetrics, RequestOutput)
from .sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams

#: vLLM's older name of the async engine.
AsyncLLMEngine = AsyncLLM

try:
    __version__ = version("tpserve")
except PackageNotFoundError:  # imported from a source tree
    __version__ = "0+unknown"

__all__ = [
    "LLM",
    "AsyncLLM",
    "AsyncLLMEngine",
    "SamplingParams",
    "StructuredOutputsParams",
    "GuidedDecodingParams",
    "LoRARequest",
    "RequestOutput",
    "CompletionOutput",
    "RequestMetrics",
    "Logprob",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "PoolingOutput",
    "PoolingRequestOutput",
]
