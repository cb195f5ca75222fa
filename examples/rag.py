#!/usr/bin/env python3
"""A minimal retrieval-augmented generation loop against tpserve alone, with only the official
`openai` client (no numpy): embed a few documents on an embedding server, retrieve the closest
ones to a question by cosine similarity, and answer with them as context on a generate server.

Start the two servers first (any model tpserve loads; SmolLM2 shown, one process per task):

    tpserve serve --model SmolLM2-135M-Instruct.Q4_1.gguf --task embed --port 8001
    tpserve serve --model SmolLM2-135M-Instruct.Q4_1.gguf --port 8000

then: python3 examples/rag.py [--embed-url http://127.0.0.1:8001/v1]
                              [--chat-url http://127.0.0.1:8000/v1] [--question "..."]

A real deployment embeds with an embedding model (e5-mistral, gte-Qwen2: `--task auto` finds
them); SmolLM2's last-token states are not trained for retrieval, so its ranking is rough.
"""

import argparse
import math

from openai import OpenAI

DOCUMENTS = [
    "The Eiffel Tower is in Paris and was finished in 1889 for the World's Fair.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "The Pacific is the largest and deepest of the Earth's oceans.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
    "Honey bees communicate the direction of flowers with a waggle dance.",
]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embed-url", default="http://127.0.0.1:8001/v1")
    ap.add_argument("--chat-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--question", default="Where is the Eiffel Tower?")
    ap.add_argument("--top-k", type=int, default=2)
    args = ap.parse_args()

    embedder = OpenAI(base_url=args.embed_url, api_key="unused")
    chat = OpenAI(base_url=args.chat_url, api_key="unused")
    embed_model = embedder.models.list().data[0].id
    chat_model = chat.models.list().data[0].id

    # 1. Index: one request embeds every document (batched by the server's scheduler).
    index = embedder.embeddings.create(model=embed_model, input=DOCUMENTS)
    vectors = [d.embedding for d in sorted(index.data, key=lambda d: d.index)]
    print(f"indexed {len(vectors)} documents, {len(vectors[0])} dimensions, "
          f"{index.usage.prompt_tokens} tokens")

    # 2. Retrieve: the documents closest to the question.
    q = embedder.embeddings.create(model=embed_model, input=args.question).data[0].embedding
    ranked = sorted(range(len(DOCUMENTS)), key=lambda i: cosine(q, vectors[i]), reverse=True)
    context = [DOCUMENTS[i] for i in ranked[: args.top_k]]
    for i in ranked[: args.top_k]:
        print(f"retrieved ({cosine(q, vectors[i]):.3f}): {DOCUMENTS[i]}")

    # 3. Answer with the retrieved context.
    answer = chat.chat.completions.create(
        model=chat_model,
        messages=[
            {"role": "system",
             "content": "Answer the question using only this context:\n" + "\n".join(context)},
            {"role": "user", "content": args.question},
        ],
        max_tokens=48,
        temperature=0,
    )
    print("answer:", answer.choices[0].message.content.strip())


if __name__ == "__main__":
    main()
