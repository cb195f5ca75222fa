"""``AsyncLLM``: the engine for asyncio programs (a web app embedding it, many concurrent
requests). ``generate`` is an async generator of cumulative ``RequestOutput``s; the engine wakes
the event loop from its own threads (``call_soon_threadsafe``), so no thread waits per request
and the loop never blocks. Cancelling the consuming task, or closing the generator, aborts the
request and frees its KV blocks."""

import asyncio
import functools
import os
from typing import Any, AsyncIterator, Optional, Union

from ._engine import EngineCore, Submission, normalize_prompts
from .lora.request import LoRARequest
from .outputs import RequestOutput
from .sampling_params import SamplingParams


def _resolve(future: "asyncio.Future[Any]", event: Any) -> None:
    if not future.done():
        future.set_result(event)


def _deliver(loop: asyncio.AbstractEventLoop, future: "asyncio.Future[Any]", event: Any) -> None:
    """Called from an engine thread with the next event."""
    try:
        loop.call_soon_threadsafe(_resolve, future, event)
    except RuntimeError:
        pass  # the loop was closed: nobody waits any more


class AsyncLLM:
    """Started like ``LLM`` (same keyword arguments, same errors); the constructor blocks until
    the engine is ready, so make it before serving or in ``loop.run_in_executor``."""

    def __init__(self, model: Union[str, os.PathLike], **kwargs: Any):
        self._core = EngineCore(model, kwargs, "AsyncLLM")

    async def generate(
        self,
        prompt: Any,
        sampling_params: Optional[SamplingParams] = None,
        request_id: Optional[str] = None,
        lora_request: Optional[LoRARequest] = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the prompt's cumulative output each time it grows; the last has
        ``finished=True``. ``lora_request`` runs it with a LoRA adapter (``enable_lora=True``)."""
        if len(normalize_prompts(prompt)) != 1:
            raise ValueError("AsyncLLM.generate takes one prompt; call it once per prompt")
        ids = None if request_id is None else [str(request_id)]
        submission = Submission(self._core, prompt, sampling_params, [priority], request_ids=ids,
                                lora_request=lora_request)
        state = submission.stream_state()
        loop = asyncio.get_running_loop()
        try:
            while True:
                future = loop.create_future()
                submission.batch.next_async(functools.partial(_deliver, loop, future))
                event = await future
                if event is None:
                    return
                yield state.apply(event)
        finally:
            submission.batch.abort()

    @property
    def max_model_len(self) -> int:
        return self._core.engine.max_model_len

    def shutdown(self) -> None:
        """Stops the engine and its workers and waits until they are gone."""
        self._core.shutdown()

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)
