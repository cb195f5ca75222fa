"""Fixtures for the tests through the official `openai` Python client.

`scripts/test-openai-client.sh` starts two real `tpserve serve` processes on the CPU and passes
their addresses here: a generating server of the default model (SmolLM2-135M-Instruct GGUF,
served as "smollm2" under Qwen2.5's real tool-capable chat template, with automatic tool choice
and the hermes parser) and an embedding server of the same checkpoint (`--task embed`, served as
"smollm2-embed", declared Matryoshka so `dimensions` is allowed). The tests talk to them with
`openai.OpenAI` as applications do, and with `httpx` where the wire itself is the point.
"""

import os

import httpx
import openai
import pytest

GEN_MODEL = "smollm2"
EMBED_MODEL = "smollm2-embed"


def _url(name: str) -> str:
    url = os.environ.get(name)
    if not url:
        pytest.exit(
            f"{name} is not set: run scripts/test-openai-client.sh, which starts the servers",
            returncode=2,
        )
    return url.rstrip("/")


@pytest.fixture(scope="session")
def gen_url() -> str:
    return _url("TPSERVE_OPENAI_GEN_URL")


@pytest.fixture(scope="session")
def embed_url() -> str:
    return _url("TPSERVE_OPENAI_EMBED_URL")


@pytest.fixture(scope="session")
def client(gen_url: str) -> openai.OpenAI:
    # No retries: a failure must show as it happened, not be retried into a pass.
    return openai.OpenAI(base_url=f"{gen_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def embed_client(embed_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{embed_url}/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture(scope="session")
def http(gen_url: str):
    with httpx.Client(base_url=gen_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def embed_http(embed_url: str):
    with httpx.Client(base_url=embed_url, timeout=120) as c:
        yield c


def token_ids(http: httpx.Client, text: str) -> list[int]:
    """The model's token ids for `text`, without special tokens (the server's /tokenize)."""
    body = {"model": GEN_MODEL, "prompt": text, "add_special_tokens": False}
    r = http.post("/tokenize", json=body)
    r.raise_for_status()
    return r.json()["tokens"]
