"""What ``LLM`` and ``AsyncLLM`` share: keyword arguments into the engine's flags (the CLI's
names, ``tensor_parallel_size`` for ``--tensor-parallel-size``), prompts into a batch of engine
requests, engine events into ``RequestOutput`` objects, and shutdown at interpreter exit."""

import atexit
import itertools
import json
import os
import random
import time
import weakref
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from . import _tpserve
from .logprobs import position, prompt_positions
from .lora.request import LoRARequest
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

#: The engine's flags: long name -> whether it takes a value.
_FLAGS: Dict[str, bool] = dict(_tpserve.engine_flags())

#: Engines not yet shut down, stopped (workers reaped) when the interpreter exits.
_LIVE: "weakref.WeakSet[EngineCore]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for core in list(_LIVE):
        core.shutdown()


def _bundled_worker() -> Optional[str]:
    """The ``tpserve-worker`` binary shipped in the wheel, if this is an installed wheel."""
    path = Path(__file__).parent / "bin" / "tpserve-worker"
    return str(path) if path.is_file() else None


def engine_argv(model: Union[str, os.PathLike], kwargs: Dict[str, Any], caller: str) -> List[str]:
    """The flags of ``tpserve generate``'s engine for ``caller(model, **kwargs)``."""
    kwargs = dict(kwargs)
    quantization = kwargs.get("quantization")
    if quantization not in (
        None,
        "gguf",
        "fp8",
        "compressed-tensors",
        "awq",
        "awq_marlin",
        "gptq",
        "gptq_marlin",
        "none",
    ):
        raise ValueError(
            f"quantization={quantization!r} is not supported: tpserve runs GGUF files (kept "
            "quantized on the CPU, quantization='gguf'; or dequantized, 'none'), unquantized "
            "safetensors checkpoints, those quantized to FP8 at load on CUDA GPUs of compute "
            "capability 8.9 or newer ('fp8'), FP8 checkpoints ('fp8' or "
            "'compressed-tensors' as their quantization_config says), and AWQ and GPTQ "
            "checkpoints ('awq' or 'gptq')"
        )
    # tpserve never runs code shipped with a model, so there is nothing to trust.
    kwargs.pop("trust_remote_code", None)
    if kwargs.get("worker_binary") is None and "TPSERVE_WORKER_BINARY" not in os.environ:
        kwargs["worker_binary"] = _bundled_worker()
    argv = ["--model", os.fspath(model)]
    for name, value in kwargs.items():
        flag = name.replace("_", "-")
        if flag not in _FLAGS or flag == "model":
            raise TypeError(f"{caller}() got an unexpected keyword argument '{name}'")
        if value is None:
            continue
        if _FLAGS[flag]:
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            argv += [f"--{flag}", os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
        elif value is True:
            argv.append(f"--{flag}")
        elif value is False:
            if f"no-{flag}" in _FLAGS:
                argv.append(f"--no-{flag}")
        else:
            raise TypeError(f"{name} must be True or False, not {value!r}")
    return argv


PromptType = Union[str, List[int], Dict[str, Any]]


def _one_prompt(prompt: Any) -> Tuple[Optional[str], Union[str, List[int]]]:
    """(the prompt text for ``RequestOutput.prompt``, what the engine tokenizes or takes)."""
    if isinstance(prompt, str):
        return prompt, prompt
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"], prompt["prompt"]
        raise ValueError("a prompt dict needs `prompt` or `prompt_token_ids`")
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return None, list(prompt)
    raise TypeError(
        f"a prompt must be a string, a list of token ids or a dict, not {type(prompt).__name__}"
    )


def normalize_prompts(prompts: Any) -> List[Tuple[Optional[str], Union[str, List[int]]]]:
    """vLLM's rules: a string, a token-id list or a dict is one prompt; a list of them is a batch."""
    if isinstance(prompts, (str, dict)):
        return [_one_prompt(prompts)]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) for t in prompts):
            return [_one_prompt(prompts)]
        return [_one_prompt(p) for p in prompts]
    raise TypeError(
        f"prompts must be a string, a list of token ids, a dict or a list of these, not {type(prompts).__name__}"
    )


def per_prompt(value: Any, count: int, what: str, default: Any) -> List[Any]:
    """One ``value`` for every prompt, or a list with one per prompt."""
    if value is None:
        return [default] * count
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{len(value)} {what} for {count} prompts")
        return list(value)
    return [value] * count


def sequence_logprobs(entries: Optional[list]) -> Tuple[Optional[list], Optional[float]]:
    """(``CompletionOutput.logprobs``, ``cumulative_logprob``) from the engine's positions."""
    if entries is None:
        return None, None
    positions = [position(e) for e in entries]
    # Each position's first entry is the chosen token.
    return positions, sum(e[0][1] for e in entries)


class Submission:
    """The prompts of one call, submitted as one batch, and how to turn its events into outputs."""

    def __init__(self, core: "EngineCore", prompts: Any, sampling_params: Any, priority: Any,
                 kind: str = "prompt", request_ids: Optional[List[str]] = None,
                 lora_request: Any = None):
        if core.engine.task != "generate":
            raise ValueError(
                "generate() and chat() need a generative model: this one was started with "
                f'task="{core.engine.task}" (use embed() or encode())'
            )
        items = normalize_prompts(prompts) if kind == "prompt" else prompts
        count = len(items)
        if count == 0:
            raise ValueError("no prompts given")
        params = per_prompt(sampling_params, count, "sampling parameters", SamplingParams())
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams, not {type(p).__name__}")
        priorities = per_prompt(priority, count, "priorities", 0)
        self.loras = per_prompt(lora_request, count, "LoRA requests", None)
        adapters = [core.load_lora(lora) for lora in self.loras]
        self.texts = [text for text, _ in items]
        self.params = params
        self.request_ids = request_ids or [core.next_request_id() for _ in range(count)]
        self.arrival = time.time()
        self.batch, self.prompt_token_ids = core.engine.submit(
            [engine_prompt for _, engine_prompt in items],
            [p._to_json(priority=pr, seed=core.next_seed()) for p, pr in zip(params, priorities)],
            adapters,
            kind,
        )
        # Sequence s belongs to prompt owner[s], as its choice choice[s].
        self.owner = [i for i, p in enumerate(params) for _ in range(p.n)]
        self.choice = [c for p in params for c in range(p.n)]
        self.first_seq = list(itertools.accumulate([0] + [p.n for p in params]))

    def _request_output(self, i: int, outputs: List[CompletionOutput], finished: bool,
                        metrics: RequestMetrics, prompt_logprobs: Optional[list]) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_ids[i],
            prompt=self.texts[i],
            prompt_token_ids=self.prompt_token_ids[i],
            prompt_logprobs=prompt_logprobs,
            outputs=outputs,
            finished=finished,
            metrics=metrics,
            lora_request=self.loras[i],
        )

    def collect(self, use_tqdm: bool) -> List[RequestOutput]:
        """Runs the batch to its end; raises if any sequence failed."""
        done = self.batch.collect(use_tqdm)
        results = []
        for i, params in enumerate(self.params):
            outputs = []
            times = []
            prompt_logprobs = None
            for choice in range(params.n):
                text, ids, lps, prompt_lps, _, reason, error, when = done[self.first_seq[i] + choice]
                if error is not None:
                    raise RuntimeError(f"request {self.request_ids[i]} failed: {error}")
                logprobs, cumulative = sequence_logprobs(lps)
                if params.logprobs is not None and logprobs is None:
                    logprobs, cumulative = [], 0.0
                outputs.append(CompletionOutput(index=choice, text=text, token_ids=ids,
                                                cumulative_logprob=cumulative, logprobs=logprobs,
                                                finish_reason=reason, lora_request=self.loras[i]))
                prompt_logprobs = prompt_logprobs or prompt_positions(prompt_lps)
                times.append(when)
            firsts = [t[0] for t in times if t[0] is not None]
            lasts = [t[1] for t in times if t[1] is not None]
            metrics = RequestMetrics(
                arrival_time=self.arrival,
                first_token_time=min(firsts) if firsts else None,
                last_token_time=max(lasts) if lasts else None,
                finished_time=max(t[2] for t in times),
            )
            results.append(self._request_output(i, outputs, True, metrics, prompt_logprobs))
        return results

    def stream_state(self) -> "StreamState":
        return StreamState(self)


class StreamState:
    """Cumulative outputs of a submission, updated one engine event at a time."""

    def __init__(self, submission: Submission):
        self.sub = submission
        self.texts = [[] for _ in submission.owner]
        self.ids = [[] for _ in submission.owner]
        self.logprobs: List[Optional[list]] = [
            [] if submission.params[i].logprobs is not None else None for i in submission.owner
        ]
        self.cumulative: List[float] = [0.0 for _ in submission.owner]
        self.prompt_logprobs: List[Optional[list]] = [None for _ in submission.params]
        self.reasons: List[Optional[str]] = [None for _ in submission.owner]
        self.metrics = [RequestMetrics(arrival_time=submission.arrival) for _ in submission.params]

    def apply(self, event: Tuple) -> RequestOutput:
        """The output of the event's prompt after ``event`` (see ``Batch.next``)."""
        seq, text, ids, lps, prompt_lps, reason, error = event
        sub = self.sub
        i = sub.owner[seq]
        if error is not None:
            raise RuntimeError(f"request {sub.request_ids[i]} failed: {error}")
        now = time.time()
        metrics = self.metrics[i]
        if ids:
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
        self.texts[seq].append(text)
        self.ids[seq].extend(ids)
        if lps is not None and self.logprobs[seq] is not None:
            self.logprobs[seq].append(position(lps))
            self.cumulative[seq] += lps[0][1]
        if prompt_lps is not None and self.prompt_logprobs[i] is None:
            self.prompt_logprobs[i] = prompt_positions(prompt_lps)
        self.reasons[seq] = reason
        first = sub.first_seq[i]
        seqs = range(first, first + sub.params[i].n)
        finished = all(self.reasons[s] is not None for s in seqs)
        if finished:
            metrics.finished_time = now
        outputs = [
            CompletionOutput(
                index=s - first, text="".join(self.texts[s]), token_ids=list(self.ids[s]),
                cumulative_logprob=None if self.logprobs[s] is None else self.cumulative[s],
                logprobs=None if self.logprobs[s] is None else list(self.logprobs[s]),
                finish_reason=self.reasons[s], lora_request=sub.loras[i],
            )
            for s in seqs
        ]
        return sub._request_output(i, outputs, finished, RequestMetrics(**vars(metrics)),
                                   self.prompt_logprobs[i])


class EngineCore:
    """One native engine and the request counter of its ``LLM`` or ``AsyncLLM``."""

    def __init__(self, model: Union[str, os.PathLike], kwargs: Dict[str, Any], caller: str):
        kwargs = dict(kwargs)
        seed = kwargs.pop("seed", None)
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int, not {type(seed).__name__}")
        self.engine = _tpserve.Engine(engine_argv(model, kwargs, caller))
        self._ids = itertools.count()
        # vLLM's engine seed: requests without a seed of their own draw one from this stream,
        # so a program that makes the same calls samples the same tokens.
        self._seeds = None if seed is None else random.Random(seed)
        _LIVE.add(self)

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def next_seed(self) -> Optional[int]:
        """The seed for a request that gives none (``None``: the engine picks at random)."""
        return None if self._seeds is None else self._seeds.getrandbits(63)

    def load_lora(self, lora: Optional[LoRARequest]) -> Optional[str]:
        """The engine's name for the adapter of ``lora`` (loaded on first use), or ``None``."""
        if lora is None:
            return None
        if not isinstance(lora, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, not {type(lora).__name__}")
        self.engine.load_lora(lora.lora_name, lora.lora_path)
        return lora.lora_name

    def render_conversations(self, messages: Any, add_generation_prompt: bool) -> List[Tuple[str, str]]:
        """One conversation (a list of message dicts) or a list of them, as (prompt text, prompt text)."""
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list, not {type(messages).__name__}")
        conversations = messages if messages and isinstance(messages[0], (list, tuple)) else [messages]
        rendered = []
        for conversation in conversations:
            try:
                as_json = json.dumps(list(conversation))
            except (TypeError, ValueError) as e:
                raise ValueError(f"messages: {e}") from None
            text = self.engine.render_chat(as_json, add_generation_prompt)
            rendered.append((text, text))
        return rendered

    def stream(self, submission: Submission) -> Iterator[RequestOutput]:
        """Yields each prompt's cumulative output as it grows; ``finished`` on its last."""
        state = submission.stream_state()
        try:
            while True:
                event = submission.batch.next()
                if event is None:
                    return
                yield state.apply(event)
        finally:
            submission.batch.abort()

    def shutdown(self) -> None:
        self.engine.shutdown()
        _LIVE.discard(self)
