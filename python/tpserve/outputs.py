"""The results of a request, with vLLM's class and field names."""

from dataclasses import dataclass, field
from typing import List, Optional

from .logprobs import PromptLogprobs, SampleLogprobs


@dataclass
class CompletionOutput:
    """One choice of a request (``n`` per prompt)."""

    index: int
    text: str
    token_ids: List[int]
    #: The sum of the generated tokens' log probabilities, when ``logprobs`` was asked for.
    cumulative_logprob: Optional[float] = None
    #: Per generated token, when ``SamplingParams.logprobs`` is set: token id -> ``Logprob``
    #: for the chosen token and the most likely ones.
    logprobs: Optional[SampleLogprobs] = None
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
    #: Per prompt token, when ``SamplingParams.prompt_logprobs`` is set (``None`` for the first).
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: List[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = None
    lora_request: Optional[object] = None
    num_cached_tokens: Optional[int] = None
    encoder_prompt: Optional[str] = field(default=None, repr=False)
    encoder_prompt_token_ids: Optional[List[int]] = field(default=None, repr=False)


@dataclass
class PoolingOutput:
    """A prompt's pooled hidden state (vLLM's ``PoolingOutput``; a list, not a tensor)."""

    data: List[float]


@dataclass
class PoolingRequestOutput:
    """``LLM.encode``'s result for one prompt."""

    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: List[int]
    finished: bool


@dataclass
class EmbeddingOutput:
    """A prompt's embedding, normalized as the model's pooler says."""

    embedding: List[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """``LLM.embed``'s result for one prompt."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: List[int]
    finished: bool
