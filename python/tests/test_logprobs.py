"""Log probabilities from `LLM.generate` against the HTTP API's for the same greedy request:
`tpserve serve` runs the same model in the test (the `http` fixture), and `/v1/completions`
answers with `logprobs` and `prompt_logprobs`.

Tolerance: both run the same f32 CPU kernels on the same single-sequence batches, so the values
agree to 1e-4 (absolute) in every position."""

import pytest

from tpserve import Logprob, SamplingParams

TOL = 1e-4
PROMPT = "The capital of France is"
K = 5


def test_logprobs_equal_the_http_apis(llm, http):
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=K, prompt_logprobs=K)
    (out,) = llm.generate(PROMPT, params)
    choice = out.outputs[0]
    answer = http.post("/v1/completions", {
        "prompt": PROMPT, "temperature": 0, "max_tokens": 12, "logprobs": K, "prompt_logprobs": K,
    })
    want = answer["choices"][0]
    assert choice.text == want["text"]
    # Each generated token: the chosen one's value and the top K by text, as completions list them.
    lps = want["logprobs"]
    assert len(choice.logprobs) == len(choice.token_ids) == len(lps["token_logprobs"])
    for position, token, value, top, text in zip(choice.logprobs, choice.token_ids,
                                                 lps["token_logprobs"], lps["top_logprobs"],
                                                 lps["tokens"]):
        assert token in position, "the chosen token is in its position's dict"
        chosen = position[token]
        assert isinstance(chosen, Logprob) and chosen.decoded_token == text
        assert abs(chosen.logprob - value) < TOL
        assert len(position) in (K, K + 1)
        by_text = {lp.decoded_token: lp.logprob for lp in position.values()}
        assert by_text.keys() == top.keys()
        for t, v in top.items():
            assert abs(by_text[t] - v) < TOL, (t, by_text[t], v)
        others = sorted(lp.rank for t, lp in position.items() if t != token)
        assert len(set(others)) == len(others) and all(1 <= r <= K for r in others)
    # Greedy: every chosen token is the most likely.
    assert all(p[t].rank == 1 for p, t in zip(choice.logprobs, choice.token_ids))
    assert choice.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for p, t in zip(choice.logprobs, choice.token_ids)), abs=1e-6)
    assert choice.cumulative_logprob < 0
    # The prompt's: None first (vLLM's), then the prompt token and the top K keyed by token id.
    prompt = out.prompt_logprobs
    want_prompt = want["prompt_logprobs"]
    assert len(prompt) == len(out.prompt_token_ids) == len(want_prompt)
    assert prompt[0] is None and want_prompt[0] is None
    for position, token, expected in zip(prompt[1:], out.prompt_token_ids[1:], want_prompt[1:]):
        assert token in position
        assert {str(t) for t in position} == set(expected)
        for t, lp in position.items():
            e = expected[str(t)]
            assert abs(lp.logprob - e["logprob"]) < TOL
            assert lp.rank == e["rank"] and lp.decoded_token == e["decoded_token"]


def test_without_logprobs_there_are_none(llm):
    (out,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4))
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None
    assert out.prompt_logprobs is None


def test_logprobs_zero_lists_only_the_chosen_token_and_sampling_keeps_them_consistent(llm):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=10, logprobs=0, n=2)
    (out,) = llm.generate(PROMPT, params)
    for choice in out.outputs:
        assert [list(p) for p in choice.logprobs] == [[t] for t in choice.token_ids]
        total = sum(p[t].logprob for p, t in zip(choice.logprobs, choice.token_ids))
        assert choice.cumulative_logprob == pytest.approx(total, abs=1e-6)
        assert all(p[t].rank >= 1 and p[t].logprob <= 0 for p, t in zip(choice.logprobs, choice.token_ids))


def test_streamed_logprobs_equal_the_collected_ones(llm):
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2, prompt_logprobs=1)
    (whole,) = llm.generate(PROMPT, params)
    partial = list(llm.stream(PROMPT, params))
    last = partial[-1]
    assert last.outputs[0].token_ids == whole.outputs[0].token_ids
    assert last.outputs[0].logprobs == whole.outputs[0].logprobs
    assert last.outputs[0].cumulative_logprob == pytest.approx(whole.outputs[0].cumulative_logprob)
    assert last.prompt_logprobs == whole.prompt_logprobs
    assert all(len(p.outputs[0].logprobs) == len(p.outputs[0].token_ids) for p in partial)


def test_too_many_logprobs_raise_the_http_message():
    with pytest.raises(ValueError, match=r"^`logprobs` must be between 0 and 20, got 21$"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match=r"^`prompt_logprobs` must be between 0 and 20, got -1$"):
        SamplingParams(prompt_logprobs=-1)
