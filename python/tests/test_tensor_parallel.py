"""Tensor parallelism on the CPU from Python: three worker processes, the same greedy text."""

from conftest import worker_children
from tpserve import LLM, SamplingParams

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_tensor_parallel_3_on_the_cpu_gives_the_tp_1_answer(model, llm):
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = [o.outputs[0].text for o in llm.chat([FRANCE, [{"role": "user", "content": "Why is the sky blue?"}]], params)]
    before = worker_children()
    with LLM(model, tensor_parallel_size=3, max_model_len=1024, device="cpu") as tp3:
        assert len(worker_children() - before) == 3
        got = [o.outputs[0].text for o in tp3.chat([FRANCE, [{"role": "user", "content": "Why is the sky blue?"}]], params)]
    assert got == expected
    assert got[0] == "The capital of France is Paris."
