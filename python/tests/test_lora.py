"""LoRA from Python: `LLM(enable_lora=True)` with `LoRARequest`s, against `tpserve serve
--lora-modules` with the same adapter (a random PEFT adapter for SmolLM2 written by the test).
Greedy outputs must be equal (the same engine path, same single-sequence batches), and differ
from the base model's."""

import pytest

from conftest import serve
from peft import write_adapter
from tpserve import LLM, LoRARequest, SamplingParams
from tpserve.lora.request import LoRARequest as LoRARequestFromModule

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(write_adapter(root / name, seed=seed)) for name, seed in (("sql", 1), ("poet", 2))}


@pytest.fixture(scope="module")
def lora_llm(model):
    engine = LLM(model, max_model_len=1024, enable_lora=True, max_loras=2, max_lora_rank=8,
                 kv_cache_space=0.5)
    yield engine
    engine.shutdown()


def test_lora_request_is_importable_both_ways():
    assert LoRARequest is LoRARequestFromModule


def test_adapter_outputs_equal_the_http_servers_and_differ_from_the_base(lora_llm, adapters,
                                                                         tpserve_bin, model):
    sql = LoRARequest("sql", 1, adapters["sql"])
    poet = LoRARequest("poet", 2, adapters["poet"])
    base = [o.outputs[0].text for o in lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    with_sql = lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=sql)
    # One adapter (or none) per prompt, mixed in one batch.
    mixed = lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=[poet, None, sql])
    with serve(tpserve_bin, "--model", model, "--max-model-len", "1024", "--kv-cache-space", "0.5",
               "--enable-lora", "--max-lora-rank", "8",
               "--lora-modules", f"sql={adapters['sql']}", f"poet={adapters['poet']}") as http:
        def over_http(name, prompt):
            body = {"model": name, "prompt": prompt, "temperature": 0, "max_tokens": 16,
                    "ignore_eos": True}
            return http.post("/v1/completions", body)["choices"][0]["text"]

        want_sql = [over_http("sql", p) for p in PROMPTS]
        want_poet = over_http("poet", PROMPTS[0])
    assert [o.outputs[0].text for o in with_sql] == want_sql
    assert all(o.lora_request == sql for o in with_sql)
    assert all(a != b for a, b in zip(want_sql, base)), (want_sql, base)
    assert [o.outputs[0].text for o in mixed] == [want_poet, base[1], want_sql[2]]
    assert want_poet != want_sql[0]


def test_streaming_and_chat_take_an_adapter(lora_llm, adapters):
    sql = LoRARequest("sql", 1, adapters["sql"])
    (whole,) = lora_llm.generate(PROMPTS[0], GREEDY, use_tqdm=False, lora_request=sql)
    last = list(lora_llm.stream(PROMPTS[0], GREEDY, lora_request=sql))[-1]
    assert last.outputs[0].text == whole.outputs[0].text
    chat = [{"role": "user", "content": "Hello"}]
    plain = lora_llm.chat(chat, GREEDY, use_tqdm=False)[0].outputs[0].text
    adapted = lora_llm.chat(chat, GREEDY, use_tqdm=False, lora_request=sql)[0].outputs[0].text
    assert plain != adapted


def test_lora_errors(llm, lora_llm, adapters, tmp_path):
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.generate("hi", lora_request=LoRARequest("sql", 1, adapters["sql"]))
    with pytest.raises(ValueError, match="id must be > 0, got 0"):
        LoRARequest("sql", 0, adapters["sql"])
    with pytest.raises(ValueError, match=r'LoRA adapter "missing": .*adapter_config\.json'):
        lora_llm.generate("hi", lora_request=LoRARequest("missing", 3, str(tmp_path / "none")))
    big = write_adapter(tmp_path / "big", rank=16)
    with pytest.raises(ValueError, match="16"):
        lora_llm.generate("hi", lora_request=LoRARequest("big", 4, str(big)))
    lora_llm.generate("hi", lora_request=LoRARequest("sql", 1, adapters["sql"]), use_tqdm=False)
    with pytest.raises(ValueError, match='name "sql" is in use'):
        lora_llm.generate("hi", lora_request=LoRARequest("sql", 1, adapters["poet"]))
    with pytest.raises(TypeError, match="lora_request must be a LoRARequest"):
        lora_llm.generate("hi", lora_request="sql")
