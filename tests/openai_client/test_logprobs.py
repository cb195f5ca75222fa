"""Log probabilities through the official client (issue 13, item 1): chat `logprobs` /
`top_logprobs`, completions `logprobs` with `echo`, and vLLM's `prompt_logprobs` in `extra_body`.

Tolerance: 2e-3 between log probabilities of the same position computed by different paths (a
prefill chunk vs a decode step, with or without a prefix-cache hit); the f32 CPU path differs
there only in summation order. Within one response they are compared exactly.
"""

import math

from conftest import GEN_MODEL, token_ids

TOL = 2e-3
CAT = [{"role": "user", "content": "Tell me a story about a cat."}]


def test_chat_logprobs_have_openais_shape_and_the_greedy_token_first(client):
    r = client.chat.completions.create(
        model=GEN_MODEL, messages=CAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=5
    )
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens == 10
    text = b""
    for e in content:
        assert e.logprob <= 0.0
        assert bytes(e.bytes).decode("utf-8") == e.token, e
        top = e.top_logprobs
        assert len(top) == 5
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        # Greedy: the chosen token is the most likely one, with the same log probability.
        assert top[0].token == e.token and top[0].logprob == e.logprob, e
        assert len({t.token for t in top}) == 5
        for t in top:
            assert bytes(t.bytes).decode("utf-8") == t.token, t
        assert sum(math.exp(t.logprob) for t in top) <= 1.0 + 1e-4
        text += bytes(e.bytes)
    assert text.decode("utf-8") == choice.message.content


def test_sampled_tokens_are_listed_with_their_own_log_probability(client):
    # Sampling at temperature 1: the chosen token may be outside the top list, but when it is
    # in it, both carry the same log probability (raw logits: before temperature, as vLLM's
    # default `logprobs_mode`).
    r = client.chat.completions.create(
        model=GEN_MODEL, messages=CAT, max_tokens=12, temperature=1.0, seed=7,
        logprobs=True, top_logprobs=20,
    )
    for e in r.choices[0].logprobs.content:
        listed = {t.token: t.logprob for t in e.top_logprobs}
        assert len(e.top_logprobs) == 20
        if e.token in listed:
            assert abs(listed[e.token] - e.logprob) < 1e-6, e
        else:
            assert e.logprob <= e.top_logprobs[-1].logprob + 1e-6, e


def test_streamed_chat_logprobs_equal_the_whole_answer(client):
    kwargs = dict(model=GEN_MODEL, messages=CAT, max_tokens=8, temperature=0,
                  logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = []
    text = ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
            text += c.delta.content or ""
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert "".join(e.token for e in streamed) == text
    for a, b in zip(streamed, whole):
        assert abs(a.logprob - b.logprob) < TOL, (a, b)
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]


def test_chat_logprobs_on_the_wire(http):
    body = {"model": GEN_MODEL, "messages": CAT, "max_tokens": 2, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    lp = http.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]
    entry = lp["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}, entry
    assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    # Without `logprobs`, the field is null (OpenAI's shape).
    body.pop("logprobs"), body.pop("top_logprobs")
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert plain["logprobs"] is None


def test_completion_echo_returns_the_prompts_log_probabilities(client, http):
    prompt = "The capital of France is"
    r = client.completions.create(
        model=GEN_MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=3, echo=True,
        extra_body={"prompt_logprobs": 2},
    )
    c = r.choices[0]
    ids = token_ids(http, prompt)
    n_prompt = r.usage.prompt_tokens
    assert n_prompt >= len(ids)
    lp = c.logprobs
    assert c.text.startswith(prompt)
    assert "".join(lp.tokens) == c.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == n_prompt + r.usage.completion_tokens
    # OpenAI: the first prompt token has no log probability and no top list.
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    offset = 0
    for i, token in enumerate(lp.tokens):
        assert lp.text_offset[i] == offset
        offset += len(token)
        if i == 0:
            continue
        top = lp.top_logprobs[i]
        # The top 3, plus the chosen token when it is not among them.
        assert 3 <= len(top) <= 4, top
        assert top[token] == lp.token_logprobs[i]
        if i >= n_prompt:  # generated greedily: the most likely token
            assert max(top.values()) == lp.token_logprobs[i]

    # vLLM's prompt_logprobs (in the choice): one entry per prompt token, the first null, each
    # a map from token id to {logprob, rank, decoded_token} holding the prompt's own token.
    plp = c.model_extra["prompt_logprobs"]
    assert len(plp) == n_prompt and plp[0] is None
    prompt_ids = ids[len(ids) - n_prompt:] if n_prompt <= len(ids) else None
    assert prompt_ids is not None, (ids, n_prompt)
    for i in range(1, n_prompt):
        entry = plp[i][str(prompt_ids[i])]
        assert entry["decoded_token"] == lp.tokens[i]
        assert abs(entry["logprob"] - lp.token_logprobs[i]) < 1e-6
        ranks = sorted(v["rank"] for v in plp[i].values())
        assert ranks[:2] == [1, 2]
        assert entry["rank"] >= 1


def test_prompt_logprobs_agree_with_the_sampled_tokens_logprob(client):
    # The log probability of the greedy next token, computed in a decode step, equals the one
    # the same token gets as part of a prompt (a prefill row).
    first = client.completions.create(
        model=GEN_MODEL, prompt="The capital of France is", max_tokens=1, temperature=0,
        logprobs=1,
    ).choices[0]
    nxt, sampled = first.text, first.logprobs.token_logprobs[0]
    echoed = client.completions.create(
        model=GEN_MODEL, prompt="The capital of France is" + nxt, max_tokens=1, temperature=0,
        logprobs=1, echo=True,
    ).choices[0].logprobs
    at = len(echoed.tokens) - 2
    assert echoed.tokens[at] == nxt
    assert abs(echoed.token_logprobs[at] - sampled) < TOL


def test_streamed_completion_logprobs_equal_the_whole_answer(client):
    kwargs = dict(model=GEN_MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                  logprobs=2)
    whole = client.completions.create(**kwargs).choices[0]
    tokens, logprobs, text = [], [], ""
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                logprobs += c.logprobs.token_logprobs
                for top in c.logprobs.top_logprobs:
                    assert 2 <= len(top) <= 3
    assert tokens == whole.logprobs.tokens
    assert "".join(tokens) == text == whole.text
    for a, b in zip(logprobs, whole.logprobs.token_logprobs):
        assert abs(a - b) < TOL
