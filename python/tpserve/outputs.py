"""The results of a request, with vLLM's class and field names."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class CompletionOutput:
    """One choice of a request (``n`` per prompt)."""

    index: int
    text: str
    token_ids: List[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list] = None
    #: ``"stop"`` (end of sequence, a stop string or stop token), ``"length"`` (``max_tokens``),
    #: ``"abort"``; ``None`` while the choice is still running.
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    lora_request: Optional[object] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When things happened to a request, in ``time.time()`` seconds."""

    arrival_time: float
    last_token_time: Optional[float] = None
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    time_in_queue: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class RequestOutput:
    """The output of one prompt: all its choices, cumulative so far (streaming) or final."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    prompt_logprobs: Optional[list]
    outputs: List[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = None
    lora_request: Optional[object] = None
    num_cached_tokens: Optional[int] = None
    encoder_prompt: Optional[str] = field(default=None, repr=False)
    encoder_prompt_token_ids: Optional[List[int]] = field(default=None, repr=False)
