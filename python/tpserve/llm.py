"""``LLM``: vLLM's offline API. ``generate`` and ``chat`` submit a whole batch at once, so the
continuous-batching scheduler runs the prompts together, and return in input order; ``stream``
yields partial outputs as they grow. The GIL is released while the engine works, and Ctrl-C
aborts the running call (its sequences are freed) and leaves the engine usable."""

import os
from typing import Any, Iterator, List, Optional, Sequence, Union

from ._engine import EngineCore, Submission, normalize_prompts, per_prompt
from .lora.request import LoRARequest
from .outputs import (EmbeddingOutput, EmbeddingRequestOutput, PoolingOutput,
                      PoolingRequestOutput, RequestOutput)
from .sampling_params import SamplingParams
from .tokenizer import Tokenizer

#: One LoRA adapter for every prompt, or one (or ``None``) per prompt.
LoRAArg = Optional[Union[LoRARequest, Sequence[Optional[LoRARequest]]]]


class LLM:
    """An engine with its workers, started from a model path and the CLI's engine options as
    keyword arguments, e.g. ``LLM(model="m.gguf", tensor_parallel_size=2, max_model_len=2048,
    dtype="auto", device="cpu", gpu_memory_utilization=0.9, enforce_eager=True)``. Options
    left out take the CLI's defaults (and ``TPSERVE_*`` variables). ``enable_lora=True`` (with
    ``max_loras``, ``max_lora_rank``) lets requests name a ``LoRARequest``; ``task="embed"``
    serves ``embed`` and ``encode`` instead of generation; ``seed`` seeds the sampling of
    requests that give no seed of their own (vLLM's engine seed). Raises ``ValueError`` (bad
    option, bad model path, unsupported architecture, a tensor-parallel size that does not fit
    the model) or ``RuntimeError`` (a worker failed to start) with the CLI's message.

    Stops its workers on ``shutdown()``, when leaving a ``with`` block, when it is deleted and
    at interpreter exit."""

    def __init__(self, model: Union[str, os.PathLike], **kwargs: Any):
        self._core = EngineCore(model, kwargs, "LLM")

    def generate(
        self,
        prompts: Any,
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        lora_request: LoRAArg = None,
        priority: Optional[List[int]] = None,
    ) -> List[RequestOutput]:
        """Completes each prompt (a string, a list of token ids, a ``{"prompt": ...}`` or
        ``{"prompt_token_ids": [...]}`` dict, or a list of these); one ``RequestOutput`` per
        prompt, in order. ``sampling_params``: one for all or one per prompt (default:
        ``SamplingParams()``); ``lora_request``: one adapter for all or one per prompt. The
        "Processed prompts" bar is drawn when ``use_tqdm`` is set and standard error is a
        terminal."""
        submission = Submission(self._core, prompts, sampling_params, priority,
                                lora_request=lora_request)
        return submission.collect(bool(use_tqdm))

    def stream(
        self,
        prompts: Any,
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        lora_request: LoRAArg = None,
        priority: Optional[List[int]] = None,
    ) -> Iterator[RequestOutput]:
        """Like ``generate``, but yields a prompt's cumulative ``RequestOutput`` each time it
        grows (``finished`` on its last); prompts of a batch interleave. Closing the iterator
        early aborts what is still running."""
        submission = Submission(self._core, prompts, sampling_params, priority,
                                lora_request=lora_request)
        return self._core.stream(submission)

    def chat(
        self,
        messages: Any,
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        lora_request: LoRAArg = None,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> List[RequestOutput]:
        """Answers one conversation (a list of ``{"role", "content"}`` dicts) or a list of
        conversations, rendered with the model's chat template."""
        if chat_template is not None:
            raise ValueError("a chat_template other than the model's is not supported yet")
        if continue_final_message:
            raise ValueError("continue_final_message is not supported yet")
        prompts = self._core.render_conversations(messages, add_generation_prompt)
        submission = Submission(self._core, prompts, sampling_params, None, kind="messages",
                                lora_request=lora_request)
        return submission.collect(bool(use_tqdm))

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt plus output) a request may have."""
        return self._core.engine.max_model_len

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer, as the engine uses it (see ``tpserve.tokenizer``)."""
        return Tokenizer(self._core.engine)

    def _pool(self, prompts: Any, truncate_prompt_tokens: Optional[int], use_tqdm: bool,
              lora_request: LoRAArg) -> List[Any]:
        items = normalize_prompts(prompts)
        loras = per_prompt(lora_request, len(items), "LoRA requests", None)
        adapters = [self._core.load_lora(lora) for lora in loras]
        batch, prompt_ids = self._core.engine.submit_embeddings(
            [engine_prompt for _, engine_prompt in items], adapters, truncate_prompt_tokens)
        done = batch.collect(bool(use_tqdm))
        results = []
        for ids, (_, _, _, _, vector, _, error, _) in zip(prompt_ids, done):
            request_id = self._core.next_request_id()
            if error is not None:
                raise RuntimeError(f"request {request_id} failed: {error}")
            results.append((request_id, vector, ids))
        return results

    def embed(self, prompts: Any, *, truncate_prompt_tokens: Optional[int] = None,
              use_tqdm: bool = True, pooling_params: Any = None,
              lora_request: LoRAArg = None) -> List[EmbeddingRequestOutput]:
        """The embedding of each prompt (a model started with ``task="embed"``): one prefill
        per prompt, batched through the same scheduler, pooled and normalized as the model's
        pooler says (``override_pooler_config`` at start-up); the same vectors as
        ``/v1/embeddings``."""
        if pooling_params is not None:
            raise ValueError("pooling_params are not supported yet: the pooler is set at start-up")
        return [
            EmbeddingRequestOutput(request_id=rid, outputs=EmbeddingOutput(vector),
                                   prompt_token_ids=ids, finished=True)
            for rid, vector, ids in self._pool(prompts, truncate_prompt_tokens, use_tqdm,
                                               lora_request)
        ]

    def encode(self, prompts: Any, pooling_params: Any = None, *,
               truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = True,
               lora_request: LoRAArg = None) -> List[PoolingRequestOutput]:
        """vLLM's pooling call: each prompt's pooled output (``outputs.data``, a list of
        floats) from a model started with ``task="embed"``; the same vectors as ``embed``."""
        if pooling_params is not None:
            raise ValueError("pooling_params are not supported yet: the pooler is set at start-up")
        return [
            PoolingRequestOutput(request_id=rid, outputs=PoolingOutput(vector),
                                 prompt_token_ids=ids, finished=True)
            for rid, vector, ids in self._pool(prompts, truncate_prompt_tokens, use_tqdm,
                                               lora_request)
        ]

    def shutdown(self) -> None:
        """Stops the engine and its workers and waits until they are gone."""
        self._core.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
