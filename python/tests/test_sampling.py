"""Every `SamplingParams` field the engine supports has its effect from Python, and those it
cannot honour raise `ValueError`. Penalties are checked against the HTTP API's answer for the
same request (the same engine feature, reached two ways)."""

import json
import re

import pytest

from tpserve import GuidedDecodingParams, SamplingParams, StructuredOutputsParams

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
LOOP = "one two three one two three one two three one two three"


def greedy(**kwargs):
    return SamplingParams(temperature=0, **kwargs)


def text_of(llm, prompt, params):
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 1.5),
    ("frequency_penalty", 1.5),
    ("repetition_penalty", 1.8),
])
def test_penalties_change_the_output_as_over_http(llm, http, field, value):
    base = text_of(llm, LOOP, greedy(max_tokens=16)).text
    got = text_of(llm, LOOP, greedy(max_tokens=16, **{field: value})).text
    want = http.post("/v1/completions", {"prompt": LOOP, "temperature": 0, "max_tokens": 16,
                                         field: value})["choices"][0]["text"]
    assert got == want
    assert got != base, f"{field} changed nothing: {got!r}"


def test_logit_bias_forces_a_token(llm):
    token = llm.get_tokenizer().encode(" banana", add_special_tokens=False)[0]
    out = text_of(llm, "The capital of France is", greedy(max_tokens=6, logit_bias={token: 100}))
    assert out.token_ids == [token] * 6


def test_logit_bias_ids_are_checked_against_the_vocabulary(llm):
    params = SamplingParams(logit_bias={10**7: 1.0})
    with pytest.raises(ValueError, match=r"`logit_bias` names token id 10000000, which is out of vocabulary"):
        llm.generate("hi", params)
    with pytest.raises(ValueError, match=r"`logit_bias` values must be numbers between -100 and 100"):
        llm.generate("hi", SamplingParams(logit_bias={5: 500}))


def test_min_tokens_keeps_the_end_token_away(llm):
    short = llm.chat(FRANCE, greedy(max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 12
    longer = llm.chat(FRANCE, greedy(max_tokens=40, min_tokens=20), use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= 20
    assert longer.text.startswith(short.text)


def test_bad_words_are_never_generated(llm):
    plain = llm.chat(FRANCE, greedy(max_tokens=16), use_tqdm=False)[0].outputs[0].text
    assert "Paris" in plain
    banned = llm.chat(FRANCE, greedy(max_tokens=16, bad_words=["Paris"]), use_tqdm=False)
    assert "Paris" not in banned[0].outputs[0].text


def test_stop_token_ids_end_the_output_at_that_token(llm):
    base = text_of(llm, "Once upon a time", greedy(max_tokens=12, ignore_eos=True))
    stop = base.token_ids[4]
    first = base.token_ids.index(stop)
    out = text_of(llm, "Once upon a time", greedy(max_tokens=12, stop_token_ids=[stop]))
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop"


def test_skip_special_tokens_false_keeps_them_in_the_text(llm):
    params = dict(max_tokens=12, ignore_eos=True)
    kept = llm.chat(FRANCE, greedy(skip_special_tokens=False, **params), use_tqdm=False)[0]
    skipped = llm.chat(FRANCE, greedy(**params), use_tqdm=False)[0]
    assert kept.outputs[0].token_ids == skipped.outputs[0].token_ids
    assert "<|im_end|>" in kept.outputs[0].text and "<|im_end|>" not in skipped.outputs[0].text


def test_truncate_prompt_tokens_keeps_the_prompts_end(llm):
    (out,) = llm.generate("one two three four five six", greedy(max_tokens=2, truncate_prompt_tokens=3))
    full = llm.get_tokenizer().encode("one two three four five six")
    assert out.prompt_token_ids == full[-3:]


@pytest.mark.parametrize("constraint, check", [
    (StructuredOutputsParams(choice=["Paris", "London", "Rome"]),
     lambda t: t in ("Paris", "London", "Rome")),
    (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"),
     lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    (StructuredOutputsParams(json={"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"], "additionalProperties": False}),
     lambda t: isinstance(json.loads(t)["city"], str)),
    (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    (StructuredOutputsParams(grammar='start: "The answer is " ("yes" | "no")'),
     lambda t: t in ("The answer is yes", "The answer is no")),
])
def test_structured_outputs_constrain_the_text(llm, constraint, check):
    params = greedy(max_tokens=60, structured_outputs=constraint)
    out = llm.chat(FRANCE, params, use_tqdm=False)[0].outputs[0]
    assert check(out.text), out.text
    assert out.finish_reason == "stop"


def test_guided_decoding_is_the_older_name(llm):
    params = greedy(max_tokens=10, guided_decoding=GuidedDecodingParams(choice=["yes", "no"]))
    assert llm.chat(FRANCE, params, use_tqdm=False)[0].outputs[0].text in ("yes", "no")


def test_a_bad_constraint_raises_at_submission(llm):
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match=r"^Invalid regex: "):
        llm.generate("hi", params)


@pytest.mark.parametrize("kwargs, message", [
    ({"include_stop_str_in_output": True}, "`include_stop_str_in_output` is not supported yet"),
    ({"allowed_token_ids": [1, 2]}, "`allowed_token_ids` is not supported yet"),
    ({"logits_processors": [lambda ids, logits: logits]}, "`logits_processors` is not supported yet"),
    ({"n": 1, "best_of": 2}, "`best_of` above `n` is not supported yet"),
    ({"detokenize": False}, "`detokenize` false is not supported yet"),
    ({"spaces_between_special_tokens": False},
     "`spaces_between_special_tokens` false is not supported yet"),
    ({"truncate_prompt_tokens": 0},
     "`truncate_prompt_tokens` must be -1 (max-model-len) or at least 1, not 0"),
    ({"min_tokens": 8, "max_tokens": 4}, "`min_tokens` (8) must not exceed `max_tokens` (4)"),
])
def test_what_the_engine_cannot_honour_is_refused(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value) == message


def test_one_constraint_at_a_time():
    with pytest.raises(ValueError, match="only use one kind of structured outputs constraint"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"),
                       guided_decoding=GuidedDecodingParams(regex="a"))
