"""`LLM.generate`, `LLM.chat` and `LLM.stream` on the real SmolLM2 GGUF, against the CLI."""

import json
import os
import pty
import subprocess
import sys

import pytest

from tpserve import CompletionOutput, RequestOutput, SamplingParams

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(temperature=0, max_tokens=24)
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):",
    "Water boils at",
    "The largest planet in the solar system is",
]


def test_chat_answers_paris(llm):
    (out,) = llm.chat(FRANCE, GREEDY)
    assert isinstance(out, RequestOutput) and out.finished
    (choice,) = out.outputs
    assert isinstance(choice, CompletionOutput)
    assert choice.text == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    assert choice.token_ids and out.prompt_token_ids
    assert out.metrics.arrival_time <= out.metrics.first_token_time <= out.metrics.finished_time


def test_generate_answers_paris(llm):
    (out,) = llm.generate("The capital of France is", GREEDY)
    assert "Paris" in out.outputs[0].text
    assert out.prompt == "The capital of France is"


def test_chat_takes_a_list_of_conversations(llm):
    colors = [{"role": "user", "content": "Name three primary colors."}]
    outs = llm.chat([FRANCE, colors], GREEDY, use_tqdm=False)
    assert [o.request_id != outs[0].request_id for o in outs] == [False, True]
    assert outs[0].outputs[0].text == "The capital of France is Paris."
    assert outs[1].outputs[0].text


def test_strings_token_ids_and_dicts_mix_in_one_batch(llm):
    text = "The capital of France is"
    ids = llm.get_tokenizer().encode(text)
    outs = llm.generate([text, ids, {"prompt_token_ids": ids}, {"prompt": text}], GREEDY)
    assert len({o.outputs[0].text for o in outs}) == 1
    assert all(o.prompt_token_ids == ids for o in outs)
    assert outs[1].prompt is None


def test_greedy_output_equals_tpserve_generate(llm, model, tpserve_bin, tmp_path):
    lines = tmp_path / "prompts.jsonl"
    lines.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    cli = subprocess.run(
        [tpserve_bin, "generate", "--model", model, "--max-model-len", "1024",
         "--input", str(lines), "--max-tokens", "24"],
        capture_output=True, text=True, env={**os.environ, "RUST_LOG": "warn"}, timeout=600,
    )
    assert cli.returncode == 0, cli.stderr
    expected = [json.loads(line)["text"] for line in cli.stdout.splitlines()]
    got = [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY)]
    assert got == expected
    assert all(got)


def test_streaming_equals_non_streaming(llm):
    params = SamplingParams(temperature=0, max_tokens=32)
    (whole,) = llm.generate("Once upon a time", params)
    partial = list(llm.stream("Once upon a time", params))
    assert len(partial) > 1
    texts = [p.outputs[0].text for p in partial]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "outputs are cumulative"
    assert [p.finished for p in partial] == [False] * (len(partial) - 1) + [True]
    assert partial[-1].outputs[0].text == whole.outputs[0].text
    assert partial[-1].outputs[0].token_ids == whole.outputs[0].token_ids
    assert partial[-1].outputs[0].finish_reason == whole.outputs[0].finish_reason == "length"


def test_a_stream_closed_early_frees_its_sequences(llm):
    stream = llm.stream(["Once upon a time"] * 4, SamplingParams(max_tokens=500, ignore_eos=True))
    next(stream)
    stream.close()
    (out,) = llm.generate("The capital of France is", GREEDY)
    assert "Paris" in out.outputs[0].text


def test_n_choices_with_a_seed_are_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12)
    first = llm.generate("Tell me a story", params)[0]
    again = llm.generate("Tell me a story", params)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.text for c in first.outputs] == [c.text for c in again.outputs]


def test_stop_strings_and_max_tokens(llm):
    (out,) = llm.chat(FRANCE, SamplingParams(temperature=0, stop=[" Paris"]))
    assert out.outputs[0].text == "The capital of France is"
    assert out.outputs[0].finish_reason == "stop"
    (out,) = llm.generate("Once upon a time", SamplingParams(max_tokens=5, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


PROGRESS_SCRIPT = """
import sys
from tpserve import LLM, SamplingParams
llm = LLM(sys.argv[1], max_model_len=1024)
prompts = [f"Write one sentence about the number {i}." for i in range(64)]
outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
assert len(outs) == 64 and all(o.finished and o.outputs[0].token_ids for o in outs)
print("GENERATED", len(outs), flush=True)
llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)
print("QUIET DONE", flush=True)
"""


def run_in_terminal(code, *args):
    """Runs `code` with standard error and output on a pseudo-terminal; returns all it wrote."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["RUST_LOG"] = "warn"
        os.execv(sys.executable, [sys.executable, "-c", code, *args])
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def test_64_prompts_finish_with_a_progress_bar_on_a_terminal(model):
    code, out = run_in_terminal(PROGRESS_SCRIPT, model)
    assert code == 0, out
    assert "GENERATED 64" in out
    bar, quiet = out.split("GENERATED 64")
    assert "Processed prompts" in bar and "64/64" in bar, bar
    assert "Processed prompts" not in quiet.split("QUIET DONE")[0]


def test_no_progress_bar_when_standard_error_is_not_a_terminal(model):
    from conftest import run_python

    done = run_python(PROGRESS_SCRIPT.replace("sys.argv[1]", repr(model)), env={"RUST_LOG": "warn"})
    assert done.returncode == 0, done.stderr
    assert "Processed prompts" not in done.stderr
