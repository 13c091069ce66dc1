"""Tokenizers: char (sorted set of characters of a text), byte (256 ids), SentencePiece.

Every tokenizer has ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``vocab_size``
and ``to_config() -> dict`` (JSON-serialisable, self-contained); ``tokenizer_from_config``
rebuilds one from that dict.  Encoding text with a character outside a char vocabulary is an
error (silently dropping characters would change what an evaluation measures).
"""
from __future__ import annotations

import base64
from typing import List


class CharTokenizer:
    """Ids are positions in the sorted set of characters of ``text`` (the whole corpus)."""

    kind = "char"

    def __init__(self, text: str):
        if not isinstance(text, str) or not text:
            raise ValueError(f"CharTokenizer needs a non-empty str to take its characters from, got {text!r:.80}")
        self.chars = "".join(sorted(set(text)))
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> List[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this char tokenizer's vocabulary "
                             f"of {self.vocab_size} characters") from None

    def decode(self, ids) -> str:
        n = self.vocab_size
        bad = [int(i) for i in ids if not 0 <= int(i) < n]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the char vocabulary [0, {n})")
        return "".join(self.chars[int(i)] for i in ids)

    def to_config(self) -> dict:
        return {"type": "char", "chars": self.chars}


class ByteTokenizer:
    """UTF-8 bytes, vocab 256; decoding replaces invalid UTF-8 sequences with U+FFFD."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        bad = [int(i) for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the byte vocabulary [0, 256)")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_config(self) -> dict:
        return {"type": "byte"}


class SentencePieceTokenizer:
    """A SentencePiece model, from a ``.model`` file or its serialized bytes (stored in the config)."""

    kind = "sentencepiece"

    def __init__(self, model_file=None, *, model_proto: bytes = None):
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - sentencepiece is a listed dependency
            raise ImportError("SentencePieceTokenizer needs the 'sentencepiece' package") from e
        if (model_file is None) == (model_proto is None):
            raise ValueError("give exactly one of model_file or model_proto")
        if model_proto is None:
            with open(model_file, "rb") as f:
                model_proto = f.read()
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except Exception as e:
            raise ValueError(f"not a valid SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return int(self.sp.GetPieceSize())

    def encode(self, text: str) -> List[int]:
        return list(self.sp.EncodeAsIds(text))

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def to_config(self) -> dict:
        return {"type": "sentencepiece", "model_proto_b64": base64.b64encode(self.model_proto).decode("ascii")}


def tokenizer_from_config(config: dict):
    """Rebuild a tokenizer from ``to_config()`` output."""
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"tokenizer config must be a dict with a 'type', got {config!r:.120}")
    kind = config["type"]
    if kind == "char":
        chars = config.get("chars")
        if not isinstance(chars, str) or not chars or len(set(chars)) != len(chars) or "".join(sorted(chars)) != chars:
            raise ValueError("char tokenizer config needs 'chars': a non-empty string of sorted unique characters")
        return CharTokenizer(chars)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        b64 = config.get("model_proto_b64")
        if not isinstance(b64, str):
            raise ValueError("sentencepiece tokenizer config needs 'model_proto_b64'")
        return SentencePieceTokenizer(model_proto=base64.b64decode(b64))
    raise ValueError(f"unknown tokenizer type {kind!r}; expected 'char', 'byte' or 'sentencepiece'")
