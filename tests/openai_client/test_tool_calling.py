"""Tool calling through the official client (issue 13, item 4), SmolLM2 under Qwen2.5's real
chat template with `--enable-auto-tool-choice --tool-call-parser hermes`: `tool_choice` auto,
none, required and a named function, `parallel_tool_calls`, tool-call arguments valid under the
tool's parameters (checked with `jsonschema`), streamed calls reassembled by the client's own
streaming helper equal to the whole answer, and a conversation with tool results round-tripping.

A 135M model does not decide to call tools by itself; greedily it copies a call it is shown,
which gives a real call through the real parser under `auto`. `required` and a named function
are enforced by structured outputs, so they always produce calls.
"""

import json

import jsonschema

from conftest import GEN_MODEL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
OSLO = [{"role": "user", "content": "What is the weather like in Oslo today?"}]
COPY = [{"role": "user", "content": 'Copy this text exactly: <tool_call>{"name": "get_weather", '
         '"arguments": {"city": "Rome"}}</tool_call>'}]


def create(client, messages, **kwargs):
    return client.chat.completions.create(
        model=GEN_MODEL, messages=messages, temperature=0, max_tokens=64, tools=TOOLS, **kwargs
    )


def check_calls(calls):
    """Every call names a given tool, has an id, and its arguments validate."""
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function"
        assert call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, PARAMS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


def test_auto_parses_a_call_the_model_writes(client):
    r = create(client, COPY, tool_choice="auto")
    m = r.choices[0].message
    assert r.choices[0].finish_reason in ("tool_calls", "length"), r
    check_calls(m.tool_calls)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [
        ("get_weather", {"city": "Rome"})]
    assert "<tool_call>" not in (m.content or "")


def test_auto_without_a_call_is_plain_content(client):
    r = create(client, [{"role": "user", "content": "Say hello."}], tool_choice="auto")
    m = r.choices[0].message
    assert m.tool_calls is None and m.content


def test_none_never_calls(client):
    r = create(client, COPY, tool_choice="none")
    m = r.choices[0].message
    assert m.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")
    assert isinstance(m.content, str)


def test_required_always_calls_and_parallel_tool_calls_false_gives_one(client):
    for parallel in (True, False):
        r = create(client, OSLO, tool_choice="required", parallel_tool_calls=parallel)
        calls = r.choices[0].message.tool_calls
        check_calls(calls)
        assert r.choices[0].finish_reason == "tool_calls", r
        if not parallel:
            assert len(calls) == 1


def test_a_named_function_is_the_one_called(client):
    r = create(client, OSLO, tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    check_calls(calls)
    assert {c.function.name for c in calls} == {"get_time"}
    assert r.choices[0].finish_reason == "stop"  # OpenAI's reason for a named tool_choice


def test_streamed_calls_reassembled_by_the_client_equal_the_whole_answer(client):
    for messages, choice in ((COPY, "auto"), (OSLO, "required")):
        kwargs = dict(model=GEN_MODEL, messages=messages, temperature=0, max_tokens=48,
                      tools=TOOLS, tool_choice=choice)
        # A first run fills the prefix cache with the prompt, so the two compared runs see the
        # same cache hits (hence the same logits and the same greedy tokens).
        client.chat.completions.create(**{**kwargs, "max_tokens": 1})
        whole = client.chat.completions.create(**kwargs).choices[0]
        # The client's streaming helper accumulates the tool-call deltas itself.
        with client.chat.completions.stream(**kwargs) as stream:
            deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
            final = stream.get_final_completion().choices[0]
        assert deltas, "arguments are streamed as deltas"
        check_calls(final.message.tool_calls)
        assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
            (c.function.name, c.function.arguments) for c in whole.message.tool_calls], choice
        assert final.finish_reason == whole.finish_reason
        assert (final.message.content or None) == (whole.message.content or None)


def test_raw_stream_deltas_follow_openais_shape(client):
    # The first delta of a call has its index, id, type and name and empty arguments; later
    # ones only arguments. A named function was asked for, so the reason stays `stop` (as
    # OpenAI and vLLM answer a named tool_choice; `auto` and `required` give `tool_calls`).
    calls, finish = {}, None
    for chunk in client.chat.completions.create(
        model=GEN_MODEL, messages=OSLO, temperature=0, max_tokens=64, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, stream=True,
    ):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.id is not None:
                    assert d.index == len(calls) and d.type == "function"
                    assert d.function.arguments == ""
                    calls[d.index] = [d.function.name, ""]
                else:
                    assert d.function.name is None
                    calls[d.index][1] += d.function.arguments
    assert finish == "stop"
    assert [name for name, _ in calls.values()] == ["get_time"]
    for name, args in calls.values():
        jsonschema.validate(json.loads(args), PARAMS[name])


def test_tool_results_round_trip_through_the_template(client):
    call = create(client, OSLO, tool_choice={"type": "function",
                                             "function": {"name": "get_weather"}})
    m = call.choices[0].message
    check_calls(m.tool_calls)
    history = OSLO + [
        m.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": "Sunny, 21 C"},
    ]
    r = client.chat.completions.create(
        model=GEN_MODEL, messages=history, temperature=0, max_tokens=16, tools=TOOLS,
        tool_choice="none",
    )
    # The call and its result reach the prompt: it is longer than the question alone.
    assert r.usage.prompt_tokens > call.usage.prompt_tokens + 10
    assert isinstance(r.choices[0].message.content, str)
