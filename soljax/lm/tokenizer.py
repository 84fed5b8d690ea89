"""Tokenizer wrapper over the ``tokenizers`` library (no torch, no transformers)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from soljax.errors import SoljaxError


class Tokenizer:
    """Encodes text without special tokens; decodes ids back to text."""

    def __init__(self, json_str: str):
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_str(json_str)
        except Exception as e:
            raise SoljaxError(f"invalid tokenizer definition: {e}") from None
        self.json = json_str
        self.fingerprint = hashlib.sha256(json_str.encode()).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise SoljaxError(f"tokenizer file not found: {path}")
        return cls(path.read_text(encoding="utf-8"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.json, encoding="utf-8")
