"""``SamplingParams`` with vLLM's fields and defaults. Values are checked when the object is
made, by the HTTP API's own code: a ``ValueError`` carries the message a 400 would."""

import json
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Union

from . import _tpserve


@dataclass
class SamplingParams:
    """How to sample, as vLLM's ``SamplingParams``. Fields the engine cannot honour yet
    (``logprobs``, ``prompt_logprobs``, ``logit_bias``) are refused with a
    ``ValueError`` rather than ignored; penalties and ``min_tokens`` apply as in vLLM."""

    n: int = 1
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    #: vLLM's default; ``None`` means up to the context length.
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _tpserve.check_sampling(self._to_json())

    def _to_json(self, priority: int = 0) -> str:
        """The fields as the JSON object the engine's checks read."""
        fields = asdict(self)
        fields["priority"] = priority
        try:
            return json.dumps(fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sampling parameters: {e}") from None

    def clone(self) -> "SamplingParams":
        """A copy (vLLM's ``SamplingParams.clone``)."""
        return SamplingParams(**asdict(self))
