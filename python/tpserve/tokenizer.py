"""``LLM.get_tokenizer()``: the served model's own tokenizer (the one the engine tokenizes
prompts with, read from ``tokenizer.json`` or from a GGUF file's metadata), with the basics of a
Hugging Face tokenizer. It is not a ``transformers`` or ``tokenizers`` object: the wheel depends
on neither, and a GGUF file has no ``tokenizer.json`` for them to load."""

import json
from typing import Any, Dict, List, Union


class Tokenizer:
    """Encodes, decodes and renders chat templates exactly as the engine does."""

    def __init__(self, engine: Any):
        self._engine = engine

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """The token ids of ``text`` (with the model's BOS when ``add_special_tokens``)."""
        return self._engine.tokenize(text, add_special_tokens)

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids``."""
        return self._engine.decode(list(token_ids), skip_special_tokens)

    def __call__(self, text: str, add_special_tokens: bool = True) -> Dict[str, List[int]]:
        """``{"input_ids": ...}``, as a Hugging Face tokenizer's call (one text)."""
        return {"input_ids": self.encode(text, add_special_tokens)}

    def apply_chat_template(self, conversation: List[Dict[str, Any]], tokenize: bool = True,
                            add_generation_prompt: bool = False,
                            **kwargs: Any) -> Union[str, List[int]]:
        """One conversation under the model's chat template: its token ids (``tokenize``) or
        its text. Only Hugging Face's ``tokenize`` and ``add_generation_prompt`` are taken."""
        if kwargs:
            raise TypeError(f"apply_chat_template() got unexpected arguments {sorted(kwargs)}")
        try:
            as_json = json.dumps(list(conversation))
        except (TypeError, ValueError) as e:
            raise ValueError(f"conversation: {e}") from None
        text = self._engine.render_chat(as_json, add_generation_prompt)
        # The template writes the special tokens itself.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary, added tokens included."""
        return self._engine.vocab_size

    def __len__(self) -> int:
        return self.vocab_size
