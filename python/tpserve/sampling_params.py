"""``SamplingParams`` with vLLM's fields and defaults, and structured outputs as vLLM's
``StructuredOutputsParams`` (and its older name ``GuidedDecodingParams``). Values are checked
when the object is made, by the HTTP API's own code: a ``ValueError`` carries the message a 400
would. Checks that need the model (``logit_bias`` ids within the vocabulary, ``bad_words``
tokenized, a grammar compiled) run when a request is submitted, with the same messages."""

import json
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

from . import _tpserve


@dataclass
class StructuredOutputsParams:
    """Output constrained to one of: a JSON schema (``json``: a dict or JSON text), a regular
    expression, a list of choices, a Lark grammar, or any JSON object (``json_object=True``).
    Enforced token by token (llguidance). Whitespace options are accepted and change nothing:
    JSON output is always compact."""

    json: Optional[Union[str, Dict[str, Any]]] = None
    regex: Optional[str] = None
    choice: Optional[List[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Optional[str] = None
    structural_tag: Optional[str] = None

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) not in (None, False)]
        if len(kinds) > 1:
            raise ValueError(
                "You can only use one kind of structured outputs constraint but multiple are "
                f"specified: {kinds}"
            )
        if self.structural_tag is not None:
            raise ValueError("`structural_tag` is not supported yet")

    def _to_dict(self) -> Dict[str, Any]:
        """The members the engine reads (vLLM's HTTP ``structured_outputs`` object)."""
        keys = ("json", "regex", "choice", "grammar", "json_object")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


#: vLLM's name before ``StructuredOutputsParams`` (``SamplingParams(guided_decoding=...)``).
class GuidedDecodingParams(StructuredOutputsParams):
    """The same constraint under vLLM's older name; ``backend`` is accepted and ignored (the
    engine has one backend)."""

    def __init__(self, *args: Any, backend: Optional[str] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.backend = backend


@dataclass
class SamplingParams:
    """How to sample, as vLLM's ``SamplingParams``. ``logprobs=k`` returns each generated
    token's log probability with the ``k`` most likely tokens (``CompletionOutput.logprobs``),
    ``prompt_logprobs=k`` the same for the prompt (``RequestOutput.prompt_logprobs``); penalties,
    ``logit_bias``, ``min_tokens``, ``bad_words``, ``stop_token_ids``, ``ignore_eos`` and
    structured outputs apply as in vLLM. Fields the engine cannot honour
    (``include_stop_str_in_output``, ``allowed_token_ids``, ``logits_processors``, ``best_of``
    above ``n``, ``detokenize=False``, ``spaces_between_special_tokens=False``) are refused with a
    ``ValueError`` rather than ignored."""

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
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    #: Keep only the prompt's last this many tokens (-1: max-model-len).
    truncate_prompt_tokens: Optional[int] = None
    #: Token id -> a bias in -100..100 added to its logit.
    logit_bias: Optional[Dict[int, float]] = field(default=None, repr=False)
    #: Words never generated (each tokenized with and without a leading space, as vLLM).
    bad_words: Optional[List[str]] = None
    allowed_token_ids: Optional[List[int]] = None
    logits_processors: Optional[list] = field(default=None, repr=False)
    structured_outputs: Optional[StructuredOutputsParams] = None
    #: vLLM's older name of ``structured_outputs``.
    guided_decoding: Optional[StructuredOutputsParams] = None

    def __post_init__(self) -> None:
        if self.structured_outputs is not None and self.guided_decoding is not None:
            raise ValueError("give `structured_outputs` or its older name `guided_decoding`, not both")
        if not self.spaces_between_special_tokens:
            raise ValueError("`spaces_between_special_tokens` false is not supported yet")
        _tpserve.check_sampling(self._to_json())

    def _to_json(self, priority: int = 0, seed: Optional[int] = None) -> str:
        """The fields as the JSON object the engine's checks read; ``seed`` stands in for an
        unset one (``LLM(seed=...)``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        guided, structured = out.pop("guided_decoding"), out.pop("structured_outputs")
        constraint = structured or guided
        out["structured_outputs"] = None if constraint is None else constraint._to_dict()
        out.pop("spaces_between_special_tokens")
        if out["logits_processors"] is not None:
            out["logits_processors"] = True
        if out["seed"] is None:
            out["seed"] = seed
        out["priority"] = priority
        try:
            return json.dumps(out)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sampling parameters: {e}") from None

    def clone(self) -> "SamplingParams":
        """A copy (vLLM's ``SamplingParams.clone``)."""
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(self)})
