"""vLLM's sampling controls through the official client (issue 13, item 2): OpenAI's
`presence_penalty`, `frequency_penalty` and `logit_bias`, and vLLM's `repetition_penalty`,
`min_tokens` and `bad_words` in `extra_body`, each checked by an effect it must have on the
greedy answer of the real model. Log probabilities are of the raw logits (before penalties and
bias), which is what lets the penalty formulas be checked from them.

Tolerance: 2e-3 on log probabilities compared across positions' formulas (see test_logprobs).
"""

from collections import Counter

from conftest import GEN_MODEL, token_ids

TOL = 2e-3
STORY = [{"role": "user", "content": "Tell me a story about a cat."}]


def greedy(client, messages=STORY, max_tokens=12, **kwargs):
    r = client.chat.completions.create(
        model=GEN_MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
        logprobs=True, top_logprobs=20, **kwargs,
    )
    return r.choices[0], r.usage


def single_token_id(http, text):
    ids = token_ids(http, text)
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens"
    return ids[0]


def test_logit_bias_minus_100_bans_a_token_the_greedy_answer_had(client, http):
    plain, _ = greedy(client)
    first = plain.logprobs.content[0]
    banned = single_token_id(http, first.token)
    biased, _ = greedy(client, logit_bias={str(banned): -100})
    tokens = [e.token for e in biased.logprobs.content]
    assert first.token not in tokens, tokens
    # With the best token out, greedy takes the runner-up of the same (unbiased) distribution.
    assert tokens[0] == first.top_logprobs[1].token


def test_logit_bias_plus_100_forces_a_token(client, http):
    forced = single_token_id(http, " banana")
    r, usage = greedy(client, max_tokens=5, logit_bias={str(forced): 100})
    assert [e.token for e in r.logprobs.content] == [" banana"] * 5
    assert usage.completion_tokens == 5


def test_min_tokens_holds_back_end_of_sequence_and_stop_strings(client, http):
    eos = single_token_id(http, "<|im_end|>")
    # End-of-sequence forced by the bias: one token, finish_reason stop...
    r, usage = greedy(client, max_tokens=6, logit_bias={str(eos): 100})
    assert (r.finish_reason, usage.completion_tokens) == ("stop", 1)
    # ...until min_tokens tokens are out.
    r, usage = greedy(client, max_tokens=6, logit_bias={str(eos): 100},
                      extra_body={"min_tokens": 6})
    assert (r.finish_reason, usage.completion_tokens) == ("length", 6)

    # A stop string early in the greedy answer ends it there, unless min_tokens says otherwise.
    plain, _ = greedy(client, max_tokens=16)
    word = plain.logprobs.content[2].token.strip()
    assert word and word in plain.message.content
    stopped, usage = greedy(client, max_tokens=16, stop=[word])
    assert stopped.finish_reason == "stop" and word not in stopped.message.content
    assert usage.completion_tokens <= 3
    held, usage = greedy(client, max_tokens=16, stop=[word], extra_body={"min_tokens": 10})
    assert usage.completion_tokens >= 10
    assert held.message.content.startswith(plain.message.content[: len(stopped.message.content)])
    assert word in held.message.content


def test_bad_words_never_appear(client):
    plain, _ = greedy(client)
    word = plain.logprobs.content[0].token.strip()
    assert word in plain.message.content
    banned, _ = greedy(client, extra_body={"bad_words": [word]})
    assert all(e.token.strip() != word for e in banned.logprobs.content)
    assert word not in banned.message.content.split()


def test_frequency_and_presence_penalties_follow_openais_formula(client):
    # Each greedy pick maximises raw logprob - frequency * count - presence * (count > 0) over
    # the tokens generated so far (OpenAI's formula, as vLLM applies it).
    for fp, pp in ((1.5, 0.5), (0.0, 2.0), (-1.0, 0.0)):
        r, _ = greedy(client, max_tokens=16, frequency_penalty=fp, presence_penalty=pp)
        counts = Counter()

        def score(t):
            c = counts[bytes(t.bytes)]
            return t.logprob - (fp * c + pp if c else 0.0)

        for e in r.logprobs.content:
            for t in e.top_logprobs:
                assert score(t) <= score(e) + TOL, (fp, pp, t, e)
            counts[bytes(e.bytes)] += 1


def test_penalties_reduce_repetition(client):
    # A flat presence penalty of 2 does not move this prompt off " cat" (its lead is larger);
    # the growing frequency penalty and the repetition penalty do.
    ask = [{"role": "user", "content": "Write the word cat twenty times: cat cat cat cat"}]
    runs = {}
    for name, kwargs in {
        "none": {},
        "frequency": {"frequency_penalty": 2.0},
        "repetition": {"extra_body": {"repetition_penalty": 2.0}},
    }.items():
        r, _ = greedy(client, messages=ask, max_tokens=16, **kwargs)
        counts = Counter(e.token for e in r.logprobs.content)
        runs[name] = counts.most_common(1)[0][1]
    assert runs["none"] >= 8, runs  # the model repeats itself when left alone
    for name in ("frequency", "repetition"):
        assert runs[name] < runs["none"], runs


def test_repetition_penalty_only_lowers_tokens_already_seen(client):
    # vLLM's repetition penalty divides positive logits (multiplies negative ones) of tokens in
    # the prompt or the output so far and leaves every other token alone. So each greedy pick
    # scores at least as high in raw logprob as any token not seen yet. A completion with echo
    # lists the prompt's tokens and the output's, each with its top 20.
    r = client.completions.create(
        model=GEN_MODEL, prompt="List some animals: dog, cat, bird, dog, cat, bird, dog,",
        max_tokens=12, temperature=0, logprobs=20, echo=True,
        extra_body={"repetition_penalty": 1.5},
    )
    lp = r.choices[0].logprobs
    n_prompt = r.usage.prompt_tokens
    checked = 0
    for i in range(n_prompt, len(lp.tokens)):
        seen = set(lp.tokens[:i])
        for token, logprob in lp.top_logprobs[i].items():
            if token not in seen:
                assert logprob <= lp.token_logprobs[i] + TOL, (i, token, lp.tokens[i])
                checked += 1
    assert checked > 0
