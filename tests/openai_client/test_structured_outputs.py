"""Structured outputs through the official client (issue 13, item 3): OpenAI's
`response_format` (json_object, json_schema with strict, and the client's own `parse` helper
with a Pydantic model), vLLM's `structured_outputs` and `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar` in `extra_body`, on chat and completions, streamed and not,
and 20 random schemas at once. Every output is checked with the `jsonschema` package (an
implementation of JSON Schema independent of ours and of llguidance) or with Python's `re`.
"""

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
from pydantic import BaseModel

from conftest import GEN_MODEL

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "pets", "address"],
    "additionalProperties": False,
}


def chat(client, prompt, max_tokens=200, **kwargs):
    r = client.chat.completions.create(
        model=GEN_MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=max_tokens, **kwargs,
    )
    return r.choices[0]


def test_response_format_json_object_gives_a_json_object(client):
    c = chat(client, "Describe a cat in JSON.", response_format={"type": "json_object"})
    assert c.finish_reason == "stop"
    assert isinstance(json.loads(c.message.content), dict)


def test_response_format_json_schema_strict_validates(client):
    c = chat(
        client, "Invent a person who lives in a city.",
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.message.content), PERSON)


class City(BaseModel):
    name: str
    country: str
    population: int
    capital: bool


def test_the_clients_parse_helper_returns_the_pydantic_model(client):
    # `parse` turns the model class into a strict json_schema response_format and parses the
    # answer back into the class: what applications built on the client do.
    r = client.chat.completions.parse(
        model=GEN_MODEL, messages=[{"role": "user", "content": "Tell me about Paris."}],
        temperature=0, max_tokens=120, response_format=City,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City), r
    jsonschema.validate(json.loads(r.choices[0].message.content), City.model_json_schema())


def test_streamed_structured_output_is_valid_json(client):
    text = ""
    finish = None
    for chunk in client.chat.completions.create(
        model=GEN_MODEL, messages=[{"role": "user", "content": "Invent a person."}],
        temperature=0, max_tokens=200, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    ):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_vllms_guided_fields_constrain_the_output(client):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    c = chat(client, "What is 12 + 30?", extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(c.message.content), schema)

    c = chat(client, "Give me a phone number.", extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", c.message.content), c.message.content

    choices = ["positive", "negative", "neutral"]
    c = chat(client, "The movie was wonderful. Sentiment?", extra_body={"guided_choice": choices})
    assert c.message.content in choices

    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]{0,2}/'
    c = chat(client, "What is 12 + 30?", extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"The answer is [1-9][0-9]{0,2}\.", c.message.content), c.message.content

    # vLLM's newer `structured_outputs` object carries the same constraints.
    c = chat(client, "Pick a colour.",
             extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert c.message.content in ("red", "green", "blue")
    c = chat(client, "Invent a person.", extra_body={"structured_outputs": {"json": PERSON}})
    jsonschema.validate(json.loads(c.message.content), PERSON)


def test_completions_are_constrained_too(client):
    r = client.completions.create(
        model=GEN_MODEL, prompt="A date: ", max_tokens=20, temperature=0,
        extra_body={"guided_regex": "20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"},
    )
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", r.choices[0].text)
    r = client.completions.create(
        model=GEN_MODEL, prompt="A person as JSON: ", max_tokens=200, temperature=0,
        extra_body={"guided_json": PERSON},
    )
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


KEYS = ["name", "id", "color", "size", "tags", "ok", "count", "kind", "price", "owner"]
WORDS = ["red", "green", "blue", "small", "large", "round"]


def random_object(rng, depth):
    """An object of 1-4 properties, some required, no others allowed (as the Rust e2e test)."""
    keys = rng.sample(KEYS, rng.randint(1, 4))
    return {"type": "object", "properties": {k: random_schema(rng, depth + 1) for k in keys},
            "required": [k for k in keys if rng.random() < 2 / 3],
            "additionalProperties": False}


def random_schema(rng, depth):
    kind = rng.randrange(8 if depth < 2 else 6)
    if kind == 0:
        return {"type": "string", "minLength": rng.randrange(3), "maxLength": 4 + rng.randrange(12)}
    if kind == 1:
        lo = rng.randrange(50) - 25
        return {"type": "integer", "minimum": lo, "maximum": lo + 1 + rng.randrange(200)}
    if kind == 2:
        # multipleOf: a bare number lets the 135M model write digits until max_tokens.
        return {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01}
    if kind == 3:
        return {"type": "boolean"}
    if kind == 4:
        start = rng.randrange(len(WORDS))
        return {"enum": [WORDS[(start + i) % len(WORDS)] for i in range(rng.randint(2, 4))]}
    if kind == 5:
        return {"type": "string", "enum": ["yes", "no"]}
    if kind == 6:
        lo = rng.randrange(2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + 1 + rng.randrange(2)}
    return random_object(rng, depth)


def test_twenty_random_schemas_at_once_each_validate(client):
    rng = random.Random(13)
    schemas = [random_object(rng, 0) for _ in range(20)]

    def run(schema):
        return chat(client, "Fill in this form with plausible values.", max_tokens=300,
                    response_format={"type": "json_schema",
                                     "json_schema": {"name": "form", "schema": schema,
                                                     "strict": True}})

    with ThreadPoolExecutor(len(schemas)) as pool:
        answers = list(pool.map(run, schemas))
    for schema, c in zip(schemas, answers):
        assert c.finish_reason == "stop", (schema, c)
        jsonschema.validate(json.loads(c.message.content), schema)
