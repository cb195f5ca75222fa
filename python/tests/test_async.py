"""`AsyncLLM`: 16 concurrent async generators on one event loop."""

import asyncio

from tpserve import AsyncLLM, SamplingParams


def test_async_llm_serves_16_concurrent_generators(model):
    async def consume(engine, i):
        outputs = []
        async for out in engine.generate(f"Tell me about the number {i}.",
                                         SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                         request_id=f"r{i}"):
            outputs.append(out)
        return outputs

    async def main(engine):
        return await asyncio.gather(*(consume(engine, i) for i in range(16)))

    with AsyncLLM(model, max_model_len=1024) as engine:
        results = asyncio.run(main(engine))
    assert len(results) == 16
    for i, outputs in enumerate(results):
        assert {o.request_id for o in outputs} == {f"r{i}"}
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        texts = [o.outputs[0].text for o in outputs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
        assert outputs[-1].outputs[0].finish_reason == "length"
        assert len(outputs[-1].outputs[0].token_ids) == 16


def test_a_cancelled_async_request_is_aborted_and_the_engine_goes_on(model):
    async def main(engine):
        async def endless():
            async for _ in engine.generate("Count forever:", SamplingParams(max_tokens=900, ignore_eos=True)):
                pass

        task = asyncio.ensure_future(endless())
        await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        async for out in engine.generate("The capital of France is",
                                         SamplingParams(temperature=0, max_tokens=8)):
            last = out
        return last

    with AsyncLLM(model, max_model_len=1024) as engine:
        last = asyncio.run(main(engine))
    assert last.finished and "Paris" in last.outputs[0].text
