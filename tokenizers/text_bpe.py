"""Byte-level BPE for text and code, trained with Hugging Face `tokenizers`.

Byte-level means every Unicode string (emoji, tabs, CRLF, NUL, trailing spaces) maps to bytes
first, so encode → decode is exact; no normalizer runs for the same reason. GPT-2's pre-split
regex keeps runs of spaces together, which is what gives code whole indentation tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def _empty_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE with exactly `vocab_size` ids (256 byte symbols + merges)."""
    tok = _empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        min_frequency=2,
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class TextBPE:
    """Encode/decode strings with a trained byte-level BPE (local ids 0..size-1)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer

    @classmethod
    def load(cls, path: str | Path) -> TextBPE:
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def to_json(self) -> str:
        return self._tok.to_str(pretty=True)

    @property
    def size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        # Byte-level decoding: an incomplete UTF-8 sequence (a cut sample) becomes U+FFFD.
        return self._tok.decode(ids, skip_special_tokens=False) if ids else ""

    def token(self, local_id: int) -> str:
        return self._tok.id_to_token(local_id)
