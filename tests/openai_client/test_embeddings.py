"""Embeddings through the official client (issue 13, item 5), SmolLM2 served with `--task embed`
(last-token pooling, normalised) and declared Matryoshka so `dimensions` is allowed: a list of
strings, token-id input (one list and a list of lists), `dimensions`, and `encoding_format`
float and base64. Also what the client does by default: it asks for base64 and decodes it.

Tolerance: 1e-4 per component between the same input's vectors computed in different batches
(the f32 CPU path; only the order of summation differs); base64 and float of one response are
the same float32 values, compared exactly.
"""

import base64
import math
import struct

from conftest import EMBED_MODEL

TOL = 1e-4
DOCS = ["The cat sat on the mat.", "Paris is the capital of France.", "A dog ran in the park."]


def f32(x):
    """`x` rounded to the nearest float32."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def close(a, b, tol=TOL):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b)) < tol


def test_a_list_of_strings_gives_one_normalised_vector_each_in_order(embed_client):
    r = embed_client.embeddings.create(model=EMBED_MODEL, input=DOCS, encoding_format="float")
    assert r.object == "list" and r.model == EMBED_MODEL
    assert [d.index for d in r.data] == [0, 1, 2]
    for d in r.data:
        assert d.object == "embedding"
        assert len(d.embedding) == 576  # SmolLM2-135M's hidden size
        assert abs(norm(d.embedding) - 1.0) < 1e-4
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    # Each alone gives the same vector as in the batch; different texts differ.
    for doc, d in zip(DOCS, r.data):
        alone = embed_client.embeddings.create(model=EMBED_MODEL, input=doc,
                                               encoding_format="float")
        assert close(alone.data[0].embedding, d.embedding)
    assert not close(r.data[0].embedding, r.data[1].embedding, 1e-2)


def test_the_clients_default_base64_round_trip_equals_float(embed_client):
    floats = embed_client.embeddings.create(model=EMBED_MODEL, input=DOCS[0],
                                            encoding_format="float").data[0].embedding
    # Without encoding_format the client asks for base64 and decodes it into floats.
    default = embed_client.embeddings.create(model=EMBED_MODEL, input=DOCS[0]).data[0].embedding
    assert list(default) == [f32(x) for x in floats]


def test_base64_is_little_endian_float32_of_the_float_answer(embed_http):
    body = {"model": EMBED_MODEL, "input": DOCS[1]}
    floats = embed_http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    b64 = embed_http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    encoded = b64["data"][0]["embedding"]
    assert isinstance(encoded, str)
    raw = base64.b64decode(encoded)
    decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    # JSON floats are float32 values printed as the shortest decimal that reads back the same.
    assert decoded == [f32(x) for x in floats]


def test_token_id_input_equals_the_text_it_encodes(embed_client, embed_http):
    texts = DOCS[:2]
    ids = [embed_http.post("/tokenize", json={"model": EMBED_MODEL, "prompt": t}).json()["tokens"]
           for t in texts]
    by_text = embed_client.embeddings.create(model=EMBED_MODEL, input=texts,
                                             encoding_format="float")
    one = embed_client.embeddings.create(model=EMBED_MODEL, input=ids[0],
                                         encoding_format="float")
    many = embed_client.embeddings.create(model=EMBED_MODEL, input=ids, encoding_format="float")
    assert one.usage.prompt_tokens == len(ids[0])
    assert close(one.data[0].embedding, by_text.data[0].embedding)
    for a, b in zip(many.data, by_text.data):
        assert close(a.embedding, b.embedding)


def test_dimensions_truncate_then_normalise(embed_client):
    full = embed_client.embeddings.create(model=EMBED_MODEL, input=DOCS[2],
                                          encoding_format="float").data[0].embedding
    for d in (32, 256):
        short = embed_client.embeddings.create(model=EMBED_MODEL, input=DOCS[2], dimensions=d,
                                               encoding_format="float").data[0].embedding
        assert len(short) == d
        assert abs(norm(short) - 1.0) < 1e-4
        head = full[:d]
        n = norm(head)
        assert close(short, [x / n for x in head])
