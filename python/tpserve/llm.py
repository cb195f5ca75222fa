"""``LLM``: vLLM's offline API. ``generate`` and ``chat`` submit a whole batch at once, so the
continuous-batching scheduler runs the prompts together, and return in input order; ``stream``
yields partial outputs as they grow. The GIL is released while the engine works, and Ctrl-C
aborts the running call (its sequences are freed) and leaves the engine usable."""

import os
from typing import Any, Iterator, List, Optional, Sequence, Union

from ._engine import EngineCore, Submission
from .outputs import RequestOutput
from .sampling_params import SamplingParams


def _refuse_lora(lora_request: Any) -> None:
    if lora_request is not None:
        raise ValueError("LoRA adapters (lora_request) are not supported yet")


class LLM:
    """An engine with its workers, started from a model path and the CLI's engine options as
    keyword arguments, e.g. ``LLM(model="m.gguf", tensor_parallel_size=2, max_model_len=2048,
    dtype="auto", device="cpu", gpu_memory_utilization=0.9, enforce_eager=True)``. Options
    left out take the CLI's defaults (and ``TPSERVE_*`` variables). Raises ``ValueError`` (bad
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
        lora_request: Any = None,
        priority: Optional[List[int]] = None,
    ) -> List[RequestOutput]:
        """Completes each prompt (a string, a list of token ids, a ``{"prompt": ...}`` or
        ``{"prompt_token_ids": [...]}`` dict, or a list of these); one ``RequestOutput`` per
        prompt, in order. ``sampling_params``: one for all or one per prompt (default:
        ``SamplingParams()``). The "Processed prompts" bar is drawn when ``use_tqdm`` is set and
        standard error is a terminal."""
        _refuse_lora(lora_request)
        submission = Submission(self._core, prompts, sampling_params, priority)
        return submission.collect(bool(use_tqdm))

    def stream(
        self,
        prompts: Any,
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        lora_request: Any = None,
        priority: Optional[List[int]] = None,
    ) -> Iterator[RequestOutput]:
        """Like ``generate``, but yields a prompt's cumulative ``RequestOutput`` each time it
        grows (``finished`` on its last); prompts of a batch interleave. Closing the iterator
        early aborts what is still running."""
        _refuse_lora(lora_request)
        submission = Submission(self._core, prompts, sampling_params, priority)
        return self._core.stream(submission)

    def chat(
        self,
        messages: Any,
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> List[RequestOutput]:
        """Answers one conversation (a list of ``{"role", "content"}`` dicts) or a list of
        conversations, rendered with the model's chat template."""
        _refuse_lora(lora_request)
        if chat_template is not None:
            raise ValueError("a chat_template other than the model's is not supported yet")
        if continue_final_message:
            raise ValueError("continue_final_message is not supported yet")
        prompts = self._core.render_conversations(messages, add_generation_prompt)
        submission = Submission(self._core, prompts, sampling_params, None, kind="messages")
        return submission.collect(bool(use_tqdm))

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt plus output) a request may have."""
        return self._core.engine.max_model_len

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """The model's token ids for ``text``."""
        return self._core.engine.tokenize(text, add_special_tokens)

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids``."""
        return self._core.engine.decode(token_ids, skip_special_tokens)

    def shutdown(self) -> None:
        """Stops the engine and its workers and waits until they are gone."""
        self._core.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
