"""Token healing: which ids may replace a prompt's last token when it is a prefix of others.

A prompt that ends on a token boundary the training data rarely has (a bare newline, where
code puts the newline and the next line's indentation in one token `'\n    '`) pushes a model
toward the rare continuation. Healing drops that last token and lets the first generated token
be any token whose text starts with the dropped text (the dropped token itself included), so the
model picks the boundary (Guidance's and Hugging Face's `token_healing`).

`healing_table(vocab)` is built once per vocabulary (cached by its content hash): BPE tokens in
byte order, so the tokens that extend a prefix are one contiguous run.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np

_TABLES: dict[str, HealingTable] = {}


@dataclass(frozen=True, eq=False)
class HealingTable:
    """The BPE ids of a unified vocabulary sorted by their bytes, and per id the run of sorted
    ids that start with its bytes (`allowed_after`); ids without a longer extension heal nothing.

    texts:  token text of each BPE id (byte-level symbols: one character per byte, so a prefix
            of the text is a prefix of the bytes)
    order:  int (n_bpe,) BPE ids (unified ids) sorted by text
    runs:   int (n_bpe, 2) [lo, hi) into `order` of the ids whose text starts with id's text
    """

    bpe_start: int
    texts: tuple[str, ...]
    order: np.ndarray
    runs: np.ndarray

    @classmethod
    def build(cls, vocab: Any) -> HealingTable:
        start = vocab.ranges.bpe_start
        texts = tuple(vocab.bpe.token(i) for i in range(vocab.bpe.size))
        ranked = sorted(range(len(texts)), key=texts.__getitem__)
        keys = [texts[i] for i in ranked]
        runs = np.zeros((len(texts), 2), dtype=np.int64)
        for i, text in enumerate(texts):
            lo = bisect.bisect_left(keys, text)
            # every key starting with `text` sorts before text + the highest character
            hi = bisect.bisect_left(keys, text + "\U0010ffff", lo)
            runs[i] = lo, hi
        return cls(start, texts, np.asarray(ranked, dtype=np.int64) + start, runs)

    def allowed_after(self, token_id: int) -> tuple[int, ...]:
        """Unified ids whose text starts with `token_id`'s text (itself included); () when it is
        not a BPE id or no longer token extends it (nothing to heal)."""
        local = token_id - self.bpe_start
        if not 0 <= local < len(self.texts):
            return ()
        lo, hi = (int(x) for x in self.runs[local])
        return tuple(sorted(int(i) for i in self.order[lo:hi])) if hi - lo > 1 else ()


def healing_table(vocab: Any) -> HealingTable:
    """The vocabulary's table, built on first use and cached by its content hash."""
    key = str(vocab.content_hash)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = HealingTable.build(vocab)
    return table
