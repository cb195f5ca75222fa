"""Log probabilities with vLLM's types: a position is a dict from token id to ``Logprob``."""

from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass
class Logprob:
    """One token's log probability at a position (vLLM's ``Logprob``). Values are the model's
    raw log-softmax, before penalties, ``logit_bias`` and temperature (vLLM's default
    ``logprobs_mode``); a banned token's is ``-inf``."""

    logprob: float
    #: 1 + the number of tokens more likely than it.
    rank: Optional[int] = None
    #: The token's own text.
    decoded_token: Optional[str] = None


#: One position: the chosen (or prompt) token first, then the most likely others.
PositionLogprobs = Dict[int, Logprob]
#: Each generated token's position.
SampleLogprobs = List[PositionLogprobs]
#: Each prompt token's position; ``None`` for the first, which has no context.
PromptLogprobs = List[Optional[PositionLogprobs]]


def position(entries) -> PositionLogprobs:
    """A position from the engine's ``(token id, logprob, rank, text)`` entries."""
    return {token: Logprob(logprob, rank, text) for token, logprob, rank, text in entries}


def prompt_positions(entries) -> Optional[PromptLogprobs]:
    """A prompt's positions from the engine's (``None`` when not asked for)."""
    if entries is None:
        return None
    return [None if e is None else position(e) for e in entries]
