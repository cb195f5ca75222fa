"""Errors: the constructor's are the CLI's (`tpserve generate` prints `error: ` and the same
text); `SamplingParams` and prompts raise `ValueError`s with the HTTP API's 400 messages."""

import json
import os
import re
import subprocess

import pytest

from tpserve import LLM, SamplingParams


def cli_error(tpserve_bin, *args):
    done = subprocess.run(
        [tpserve_bin, "generate", "--prompt", "hi", *args],
        capture_output=True, text=True, env={**os.environ, "RUST_LOG": "warn"}, timeout=600,
    )
    assert done.returncode != 0
    line = [l for l in done.stderr.splitlines() if l.startswith("error: ")][-1]
    return line[len("error: "):]


def test_a_bad_model_path_raises_the_cli_message(tpserve_bin, tmp_path):
    missing = str(tmp_path / "no-such-model.gguf")
    with pytest.raises(ValueError) as e:
        LLM(missing)
    assert str(e.value) == cli_error(tpserve_bin, "--model", missing)
    assert "no-such-model.gguf" in str(e.value)


def test_an_unsupported_architecture_raises_the_cli_message(tpserve_bin, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 100,
        "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
    }))
    with pytest.raises(ValueError) as e:
        LLM(tmp_path)
    assert str(e.value) == cli_error(tpserve_bin, "--model", str(tmp_path))
    assert "GPT2LMHeadModel" in str(e.value)


def test_a_tensor_parallel_size_that_does_not_divide_the_heads_raises_the_cli_message(model, tpserve_bin):
    with pytest.raises(RuntimeError) as e:
        LLM(model, tensor_parallel_size=2)
    assert "9 attention heads" in str(e.value) and "size 2" in str(e.value)
    # Both ranks refuse; which one is reported first varies from run to run.
    def without_rank(message):
        return re.sub(r"^worker \d+ ", "worker N ", message)

    cli = cli_error(tpserve_bin, "--model", model, "--tensor-parallel-size", "2")
    assert without_rank(str(e.value)) == without_rank(cli)


def test_bad_engine_options_are_refused(model):
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_option'"):
        LLM(model, no_such_option=1)
    with pytest.raises(ValueError, match="--max-model-len 100000 is longer than the model's context"):
        LLM(model, max_model_len=100000)
    with pytest.raises(ValueError, match="unknown --device"):
        LLM(model, device="tpu")
    with pytest.raises(ValueError, match="quantization='bitsandbytes' is not supported"):
        LLM(model, quantization="bitsandbytes")


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 3}, "`temperature` must be between 0 and 2, got 3"),
    ({"top_p": 0}, "`top_p` must be in (0, 1], got 0"),
    ({"top_k": -2}, "`top_k` must be -1 or 0 (disabled) or at least 1, got -2"),
    ({"min_p": 1.5}, "`min_p` must be between 0 and 1, got 1.5"),
    ({"n": 0}, "`n` must be between 1 and 128, got 0"),
    ({"max_tokens": 0}, "`max_tokens` must be at least 1, got 0"),
    ({"presence_penalty": 2.5}, "`presence_penalty` must be between -2 and 2, got 2.5"),
    ({"logprobs": 21}, "`logprobs` must be between 0 and 20, got 21"),
    ({"min_tokens": -1}, "`min_tokens` must be at least 0, got -1"),
])
def test_sampling_params_raise_the_http_400_messages(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value) == message


def test_prompts_the_engine_cannot_take_raise_value_errors(llm):
    with pytest.raises(ValueError) as e:
        llm.generate("word " * 2000, SamplingParams(max_tokens=4))
    assert str(e.value).startswith("This model's maximum context length is 1024 tokens. However, your prompt has")
    with pytest.raises(ValueError, match="Token id 999999 is out of vocabulary"):
        llm.generate([[1, 2, 999999]])
    with pytest.raises(ValueError, match=r"^prompt 1: The prompt is empty\.$"):
        llm.generate(["fine", ""])
