#!/usr/bin/env python3
"""Checks structured outputs on the GPU: constrained requests to a `tpserve serve --device cuda`
produce output that parses and matches its constraint, beside unconstrained requests.

What: starts BIN_DIR/tpserve serve --model MODEL --device cuda (plus --serve-arg arguments),
sends at once: `response_format` json_object, a json_schema (an object with an enum, an integer
with bounds and a boolean, all required), a `guided_regex`, a `guided_choice`, each twice
(greedy and sampled with a seed), and 4 plain completions; a constrained output that ended with
"stop" must parse and validate, one cut by `max_tokens` ("length") must be a prefix the
constraint allows (not checked beyond the choice and regex prefixes). Writes the figures to --out
as JSON.

Why: issue 13 (item 3): the mask reaches the worker in the step plan and a GPU step with a masked
row takes the host extras path; this is its only check on a GPU.

How: structured_check.py --bin BIN_DIR --model DIR --out OUT.json
Exit status 0 when every request answered 200 and every finished output matched.
"""

import argparse
import concurrent.futures
import json
import re
import sys

import server as srv

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "count", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{3}-[0-9]{2}"
CHOICES = ["alpha", "beta", "gamma"]


def valid_schema(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"color", "count", "ok"}
            and value["color"] in ("red", "green", "blue")
            and isinstance(value["count"], int) and not isinstance(value["count"], bool)
            and 0 <= value["count"] <= 99 and isinstance(value["ok"], bool))


def cases() -> list:
    base = {"model": "m", "prompt": "Answer: ", "max_tokens": 96}
    constrained = [
        ("json_object", {"response_format": {"type": "json_object"}}),
        ("json_schema", {"response_format": {"type": "json_schema", "json_schema": {
            "name": "thing", "schema": SCHEMA, "strict": True}}}),
        ("regex", {"guided_regex": REGEX}),
        ("choice", {"guided_choice": CHOICES}),
    ]
    out = []
    for name, extra in constrained:
        out.append((name, dict(base, temperature=0, **extra)))
        out.append((name, dict(base, temperature=1.0, seed=7, **extra)))
    for i in range(4):
        out.append(("plain", dict(base, prompt=f"Plain request {i}: ", temperature=0,
                                  max_tokens=32, ignore_eos=True)))
    return out


def check(name: str, text: str, finish: str) -> str | None:
    """None when `text` fits its constraint, else why not."""
    if name == "plain" or finish != "stop":
        if name == "choice" and not any(c.startswith(text) for c in CHOICES):
            return f"choice: {text!r} is no choice's prefix"
        return None
    if name == "regex":
        return None if re.fullmatch(REGEX, text) else f"regex: {text!r}"
    if name == "choice":
        return None if text in CHOICES else f"choice: {text!r}"
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"{name}: {text!r} does not parse: {e}"
    if name == "json_object" and not isinstance(value, dict):
        return f"json_object: {text!r} is not an object"
    if name == "json_schema" and not valid_schema(value):
        return f"json_schema: {text!r} does not validate"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--serve-arg", action="append", default=[])
    args = ap.parse_args()
    serve = ["--model", args.model, "--device", "cuda", "--max-model-len", "1024",
             "--served-model-name", "m", *args.serve_arg]
    server, base, log = srv.start(args.bin, serve, args.out + ".log")
    problems, finished = [], {"stop": 0, "length": 0}
    try:
        if srv.wait_healthy(server, base) is None:
            return 1
        todo = cases()
        with concurrent.futures.ThreadPoolExecutor(len(todo)) as pool:
            answers = list(pool.map(lambda c: srv.post(base + "/v1/completions", c[1]), todo))
        for (name, _), (status, answer) in zip(todo, answers):
            if status != 200:
                problems.append(f"{name}: status {status}: {answer}")
                continue
            choice = answer["choices"][0]
            if name != "plain":
                finished[choice["finish_reason"]] = finished.get(choice["finish_reason"], 0) + 1
            why = check(name, choice["text"], choice["finish_reason"])
            if why:
                problems.append(why)
        result = {"requests": len(todo), "constrained_finished": finished, "problems": problems}
        with open(args.out, "w") as f:
            json.dump(result, f)
        print(f"structured_check {len(todo)} requests (8 constrained), constrained finish "
              f"reasons {finished}, problems: {problems or 'none'}")
    finally:
        srv.stop(server, log)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
