"""Tokenizers: a byte-level default and any local `tokenizers` JSON or SentencePiece model by path.

Every tokenizer here exposes the same small interface the trainer needs:

    tok = load_tokenizer(None)            # bytes; or "path/tokenizer.json"; or "path/spm.model"
    tok.vocab_size, tok.pad_id, tok.eos_id
    ids = tok.encode("a red circle")      # list[int], without padding, ending with eos
    batch = tok.batch([...], max_len=T)   # (B, T) int64 padded with pad_id, truncated to T

The caption always ends with an end-of-sequence token (when it fits) so the decoder learns where a
caption stops; padding is ignored by the loss.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch


class _Tokenizer:
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _set_special_ids(self, size: int, pad: int | None, eos: int | None) -> None:
        """Use the file's own pad and eos ids; append any it lacks after its `size` ids."""
        if eos is None:
            eos, size = size, size + 1
        if pad is None:
            pad, size = size, size + 1
        self.pad_id, self.eos_id, self.vocab_size = pad, eos, size

    def encode_padded(self, text: str, max_len: int) -> torch.Tensor:
        """(max_len,) int64: the ids of `text` truncated to max_len, then padded with pad_id."""
        ids = self.encode(text)[:max_len]
        out = torch.full((max_len,), self.pad_id, dtype=torch.int64)
        out[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def batch(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """(B, max_len) int64 padded with pad_id."""
        return torch.stack([self.encode_padded(t, max_len) for t in texts]) if texts else torch.empty(0, max_len, dtype=torch.int64)


class ByteTokenizer(_Tokenizer):
    """pad = 0, eos = 1, 2 reserved (the decoder has its own learned BOS), UTF-8 byte b -> b + 3:
    259 ids, the vocabulary of the "tiny" preset."""

    name = "bytes"
    OFFSET = 3

    def __init__(self):
        self.pad_id = 0
        self.eos_id = 1
        self.vocab_size = 256 + self.OFFSET

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")] + [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", errors="replace")


class HFTokenizer(_Tokenizer):
    """A `tokenizers` JSON file (tokenizer.json). Its own pad/eos tokens are used when it defines
    them; otherwise they are appended after the vocabulary."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.name = path
        self._tok = Tokenizer.from_file(path)
        self._set_special_ids(
            self._tok.get_vocab_size(with_added_tokens=True),
            pad=_first_id(self._tok.token_to_id, ("<pad>", "[PAD]", "<|pad|>")),
            eos=_first_id(self._tok.token_to_id, ("</s>", "<eos>", "[SEP]", "<|endoftext|>")),
        )

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ids + [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([i for i in ids if i not in (self.pad_id, self.eos_id)])


class SentencePieceTokenizer(_Tokenizer):
    """A SentencePiece model file (.model); needs the `sentencepiece` package."""

    def __init__(self, path: str):
        try:
            import sentencepiece as spm
        except ImportError as exc:
            raise ImportError(f"loading the SentencePiece model {path!r} needs `pip install sentencepiece`") from exc
        self.name = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self._set_special_ids(
            self._sp.get_piece_size(),
            pad=self._sp.pad_id() if self._sp.pad_id() >= 0 else None,
            eos=self._sp.eos_id() if self._sp.eos_id() >= 0 else None,
        )

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text)) + [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([i for i in ids if i < self._sp.get_piece_size() and i not in (self.pad_id, self.eos_id)])


def _first_id(lookup, names) -> int | None:
    for name in names:
        token_id = lookup(name)
        if token_id is not None:
            return token_id
    return None


def load_tokenizer(spec: str | None) -> _Tokenizer:
    """None or "bytes" -> ByteTokenizer; a .json file -> `tokenizers`; a .model file -> SentencePiece."""
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"tokenizer file {spec!r} does not exist (use 'bytes' for the byte-level tokenizer)")
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise ValueError(f"tokenizer {spec!r}: expected 'bytes', a tokenizers .json file or a SentencePiece .model file")
