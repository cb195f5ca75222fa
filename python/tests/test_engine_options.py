"""`LLM(seed=...)`, `llm.get_tokenizer()`, and `llm.embed` / `llm.encode` on a model started with
`task="embed"`, against the HTTP API (`/tokenize`, `/v1/embeddings`) of `tpserve serve`.

Tolerance for embeddings: the SDK and the server run the same f32 CPU kernels, but a batch of
inputs may be split into steps differently, so vectors agree to 1e-3 in every component (as in
tests/tests/embeddings.rs)."""

import pytest

from conftest import serve
from tpserve import LLM, EmbeddingRequestOutput, PoolingRequestOutput, SamplingParams

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = ["The capital of France is Paris.", "Rivers flow to the sea.", "def f(x): return x"]


def test_the_tokenizer_is_the_engines(llm, http):
    tok = llm.get_tokenizer()
    ids = tok.encode("The capital of France is")
    assert ids == http.post("/tokenize", {"prompt": "The capital of France is"})["tokens"]
    assert tok("The capital of France is") == {"input_ids": ids}
    assert tok.decode(tok.encode("Hello world", add_special_tokens=False)) == "Hello world"
    assert tok.vocab_size == len(tok) > 40000
    (out,) = llm.chat(FRANCE, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert tok.apply_chat_template(FRANCE, add_generation_prompt=True) == out.prompt_token_ids
    text = tok.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    assert "What is the capital of France?" in text and text.endswith("assistant\n")


def test_an_engine_seed_makes_sampling_reproducible(model):
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)

    def two_calls():
        with LLM(model, max_model_len=256, kv_cache_space=0.25, seed=1234) as engine:
            return [engine.generate("Tell me a story", params, use_tqdm=False)[0].outputs[0].token_ids
                    for _ in range(2)]

    first, again = two_calls(), two_calls()
    assert first == again
    # Each request draws its own seed from the engine's stream.
    assert first[0] != first[1]
    with pytest.raises(TypeError, match="seed must be an int"):
        LLM(model, seed="1")


@pytest.fixture(scope="module")
def embedder(model):
    engine = LLM(model, task="embed", max_model_len=256, kv_cache_space=0.25)
    yield engine
    engine.shutdown()


def test_embed_equals_the_http_embeddings(embedder, model, tpserve_bin):
    outs = embedder.embed(TEXTS, use_tqdm=False)
    with serve(tpserve_bin, "--model", model, "--task", "embed", "--max-model-len", "256",
               "--kv-cache-space", "0.25") as http:
        want = [d["embedding"] for d in http.post("/v1/embeddings", {"input": TEXTS})["data"]]
    assert all(isinstance(o, EmbeddingRequestOutput) and o.finished for o in outs)
    for out, expected, text in zip(outs, want, TEXTS):
        got = out.outputs.embedding
        assert len(got) == len(expected) == out.outputs.hidden_size == 576
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-3
        assert abs(sum(x * x for x in got) - 1.0) < 1e-4, "normalized"
        assert out.prompt_token_ids == embedder.get_tokenizer().encode(text)
    pooled = embedder.encode(TEXTS[0], use_tqdm=False)
    assert isinstance(pooled[0], PoolingRequestOutput)
    assert max(abs(a - b) for a, b in zip(pooled[0].outputs.data, outs[0].outputs.embedding)) < 1e-3


def test_embedding_errors(embedder, llm):
    with pytest.raises(ValueError, match=r'embed\(\) needs an embedding model'):
        llm.embed("hi")
    with pytest.raises(ValueError, match=r'need a generative model: this one was started with task="embed"'):
        embedder.generate("hi", use_tqdm=False)
    (short,) = embedder.embed("one two three four five", truncate_prompt_tokens=2, use_tqdm=False)
    assert len(short.prompt_token_ids) == 2
    with pytest.raises(ValueError, match="maximum context length is 256 tokens"):
        embedder.embed("word " * 400)
