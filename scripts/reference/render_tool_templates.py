#!/usr/bin/env python3
"""Renders tool-calling conversations with the real Qwen2.5, Llama 3.1 and Mistral Nemo chat
templates (scripts/fetch-chat-templates.sh) in Python's Jinja2, set up as transformers sets up
its chat-template environment (sandboxed, trim_blocks, lstrip_blocks, loop controls, `tojson` as
`json.dumps(ensure_ascii=False)`, `raise_exception`), and writes the prompts to
tests/fixtures/goldens/tool-templates.json. The coordinator's tests render the same requests
through tpserve's own path (request JSON -> template messages and tools -> minijinja) and must
produce the same strings byte for byte.

The template context is what vLLM gives a Hugging Face template for an OpenAI request: each
message's role and content (null content as ""), `tool_calls` with `function.arguments` parsed
from its JSON string into an object, `tool_call_id`; `tools` as
`[{"type": "function", "function": {"name", "description", "parameters"}}]`.

    python3 scripts/reference/render_tool_templates.py [TEMPLATE_DIR]
"""

import copy
import json
import os
import subprocess
import sys

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "description": "Current weather in a city — °C by default",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Zürich"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time",
    "description": "Local time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                   "required": ["tz"]}}}


def call(id_, name, args):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CASES = [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", None, None, {
        "messages": [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "Weather and time in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                call("call_a1", "get_weather", {"city": "Paris", "unit": "celsius"}),
                call("call_b2", "get_time", {"tz": "Europe/Paris"})]},
            {"role": "tool", "tool_call_id": "call_a1", "content": "{\"temp\": 21}"},
            {"role": "tool", "tool_call_id": "call_b2", "content": "14:05"},
        ],
        "tools": [WEATHER, TIME]}),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", None, None, {
        "messages": [{"role": "user", "content": "Hi"}]}),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                call("call_a1", "get_weather", {"city": "Paris"})]},
            {"role": "tool", "tool_call_id": "call_a1", "content": "{\"temp\": 21}"},
        ],
        "tools": [WEATHER, TIME]}),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", {
        "messages": [{"role": "user", "content": "Hi"}]}),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>", {
        "messages": [
            {"role": "user", "content": "Weather in Paris and Lyon?"},
            {"role": "assistant", "content": None, "tool_calls": [
                call("a1b2c3d4e", "get_weather", {"city": "Paris"}),
                call("f5g6h7i8j", "get_weather", {"city": "Lyon"})]},
            {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "21"},
            {"role": "tool", "tool_call_id": "f5g6h7i8j", "content": "19"},
            {"role": "assistant", "content": "Paris 21, Lyon 19."},
            {"role": "user", "content": "And Nice?"},
        ],
        "tools": [WEATHER]}),
]


def environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def context(request):
    """What vLLM hands a Hugging Face template."""
    messages = []
    for m in request["messages"]:
        out = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            calls = copy.deepcopy(m["tool_calls"])
            for c in calls:
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
            out["tool_calls"] = calls
        if "tool_call_id" in m:
            out["tool_call_id"] = m["tool_call_id"]
        messages.append(out)
    tools = None
    if request.get("tools"):
        tools = [{"type": "function", "function": {
            "name": t["function"]["name"],
            "description": t["function"].get("description"),
            "parameters": t["function"].get("parameters")}} for t in request["tools"]]
    return messages, tools


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else subprocess.run(
        [os.path.join(ROOT, "scripts/fetch-chat-templates.sh")], capture_output=True, text=True,
        check=True).stdout.strip()
    env = environment()
    cases = []
    for name, bos, eos, request in CASES:
        with open(os.path.join(directory, name)) as f:
            template = env.from_string(f.read())
        messages, tools = context(request)
        kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
        rendered = template.render(messages=messages, tools=tools, add_generation_prompt=True,
                                   **kwargs)
        cases.append({"template": name, "bos_token": bos, "eos_token": eos, "request": request,
                      "rendered": rendered})
    out = os.path.join(ROOT, "tests/fixtures/goldens/tool-templates.json")
    with open(out, "w") as f:
        json.dump({"generator": "scripts/reference/render_tool_templates.py",
                   "jinja2": jinja2.__version__, "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(cases)} renderings to {out}")


if __name__ == "__main__":
    main()
