"""Bad requests for the fields of issue 13 raise the client's own exceptions
(`BadRequestError` for a 400, `NotFoundError` for a 404), carrying OpenAI's error body:
`{"error": {"message", "type", "param", "code"}}`, with `param` naming the field at fault.
"""

import openai
import pytest

from conftest import EMBED_MODEL, GEN_MODEL

USER = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def error_of(excinfo, status):
    e = excinfo.value
    assert e.status_code == status
    body = e.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    # The client exposes the same fields.
    assert (e.param, e.code, e.type) == (
        body["error"]["param"], body["error"]["code"], body["error"]["type"])
    return body["error"]


CHAT_400 = [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"max_tokens": 4, "extra_body": {"min_tokens": 8}}, "min_tokens"),  # more than max_tokens
    ({"extra_body": {"bad_words": [""]}}, "bad_words"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
     "response_format"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"extra_body": {"guided_grammar": "start: undefined_rule"}}, "guided_grammar"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice"),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [TOOL, TOOL], "tool_choice": "none"}, "tools[1].function.name"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
]


@pytest.mark.parametrize("fields,param", CHAT_400, ids=[p for _, p in CHAT_400])
def test_bad_chat_fields_are_400s_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model=GEN_MODEL, messages=USER, **{"max_tokens": 4, **fields}
        )
    e = error_of(excinfo, 400)
    assert e["type"] == "invalid_request_error"
    assert e["param"] == param, e


COMPLETION_400 = [
    ({"logprobs": 21}, "logprobs"),
    ({"stream": True, "extra_body": {"prompt_logprobs": 1}}, "prompt_logprobs"),
    ({"extra_body": {"prompt_logprobs": 21}}, "prompt_logprobs"),
]


@pytest.mark.parametrize("fields,param", COMPLETION_400, ids=[p for _, p in COMPLETION_400])
def test_bad_completion_fields_are_400s_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.completions.create(model=GEN_MODEL, prompt="Hi", max_tokens=4, **fields)
    assert error_of(excinfo, 400)["param"] == param


EMBED_400 = [
    ({"input": []}, "input"),
    ({"input": [[1, 99999999]]}, "input"),
    ({"input": "hi", "dimensions": 0}, "dimensions"),
    ({"input": "hi", "dimensions": 577}, "dimensions"),
    ({"input": "hi", "encoding_format": "hex"}, "encoding_format"),
]


@pytest.mark.parametrize("fields,param", EMBED_400, ids=[p for _, p in EMBED_400])
def test_bad_embedding_requests_are_400s_naming_the_field(embed_client, fields, param):
    with pytest.raises(openai.BadRequestError) as excinfo:
        embed_client.embeddings.create(model=EMBED_MODEL, **fields)
    assert error_of(excinfo, 400)["param"] == param


def test_an_unknown_model_is_a_404_on_every_endpoint(client, embed_client):
    calls = [
        lambda: client.chat.completions.create(model="nope", messages=USER, logprobs=True),
        lambda: client.completions.create(model="nope", prompt="Hi", logprobs=2),
        lambda: embed_client.embeddings.create(model="nope", input="hi"),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as excinfo:
            call()
        e = error_of(excinfo, 404)
        assert (e["param"], e["code"]) == ("model", "model_not_found")
        assert "nope" in e["message"]


def test_each_server_refuses_the_other_task_with_a_400(client, embed_client):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.embeddings.create(model=GEN_MODEL, input="hi")
    assert "embeddings" in error_of(excinfo, 400)["message"].lower()
    with pytest.raises(openai.BadRequestError) as excinfo:
        embed_client.chat.completions.create(model=EMBED_MODEL, messages=USER)
    error_of(excinfo, 400)
