"""A judge that is not a contestant: an interpolated trigram model of the corpus's train split.

The diffusion model and the AR baseline are both scored by the same held-out judge — neither of
their weights — so the AR baseline no longer grades its own samples. One model per modality over
content ids (the unified vocabulary, specials dropped), counted on the train split only; prompts
come from the test split. Probability of token c after (a, b):

    p(c | a, b) = l3 * n(a b c) / n(a b .) + l2 * n(b c) / n(b .) + l1 * n(c) / N + l0 / V

(a level whose context was never seen gives its weight to the levels below). Lower NLL per token
is better; a sample that copies common training n-grams scores well, so read it next to the
repetition and entropy columns. Counting 11M tokens takes a few seconds (numpy, no torch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

LAMBDAS = (0.6, 0.3, 0.09, 0.01)  # trigram, bigram, unigram, uniform


def _counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq, counts.astype(np.float64)


def _lookup(table: tuple[np.ndarray, np.ndarray], keys: np.ndarray) -> np.ndarray:
    uniq, counts = table
    if uniq.size == 0:
        return np.zeros(keys.shape, dtype=np.float64)
    at = np.clip(np.searchsorted(uniq, keys), 0, uniq.size - 1)
    return np.where(uniq[at] == keys, counts[at], 0.0)


class TrigramJudge:
    """Interpolated trigram model of documents of content ids (see the module docstring)."""

    def __init__(self, docs: Iterable[Sequence[int]], vocab_size: int,
                 lambdas: tuple[float, float, float, float] = LAMBDAS) -> None:  # fmt: skip
        self.V = int(vocab_size)
        self.lambdas = lambdas
        arrays = [np.asarray(d, dtype=np.int64) for d in docs]
        arrays = [a for a in arrays if a.size]
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        doc = np.repeat(np.arange(len(arrays)), [a.size for a in arrays])
        self.tokens = int(flat.size)
        self.unigram = np.bincount(flat, minlength=self.V).astype(np.float64)
        V = np.int64(self.V)
        same2 = doc[1:] == doc[:-1]
        bi = flat[:-1][same2] * V + flat[1:][same2]
        same3 = (doc[2:] == doc[:-2]) if flat.size > 2 else np.zeros(0, dtype=bool)
        tri = (flat[:-2][same3] * V + flat[1:-1][same3]) * V + flat[2:][same3]
        self.bigram, self.bigram_ctx = _counts(bi), _counts(bi // V)
        self.trigram, self.trigram_ctx = _counts(tri), _counts(tri // V)

    def token_nll(self, context: Sequence[int], new: Sequence[int]) -> np.ndarray:
        """NLL (nats) of each token of `new` given `context` + the tokens of `new` before it."""
        ids = np.asarray(list(context) + list(new), dtype=np.int64)
        n = len(new)
        if n == 0:
            return np.zeros(0)
        c = ids[-n:]
        idx = np.arange(ids.size - n, ids.size)
        b = np.where(idx >= 1, ids[np.maximum(idx - 1, 0)], -1)
        a = np.where(idx >= 2, ids[np.maximum(idx - 2, 0)], -1)
        V = np.int64(self.V)
        l3, l2, l1, l0 = self.lambdas
        p_uni = self.unigram[np.clip(c, 0, self.V - 1)] / max(self.tokens, 1)
        p = l0 / self.V + l1 * p_uni
        # bigram level
        ctx_b = _lookup(self.bigram_ctx, np.where(b >= 0, b, -1))
        has_b = ctx_b > 0
        p_bi = np.where(has_b, _lookup(self.bigram, b * V + c) / np.maximum(ctx_b, 1), 0.0)
        # trigram level
        key_ab = np.where((a >= 0) & (b >= 0), a * V + b, -1)
        ctx_ab = _lookup(self.trigram_ctx, key_ab)
        has_ab = ctx_ab > 0
        p_tri = np.where(has_ab, _lookup(self.trigram, key_ab * V + c) / np.maximum(ctx_ab, 1), 0)
        # unseen contexts pass their weight down: renormalise over the levels present
        w3 = np.where(has_ab, l3, 0.0)
        w2 = np.where(has_b, l2, 0.0)
        total = w3 + w2 + l1 + l0
        p = (w3 * p_tri + w2 * p_bi + p) / total
        return -np.log(np.maximum(p, 1e-300))

    def nll(self, context: Sequence[int], new: Sequence[int]) -> float | None:
        """Mean NLL per token of `new` (None when empty)."""
        return float(self.token_nll(context, new).mean()) if len(new) else None


def judges_from_corpus(corpus: str, vocab_size: int, modalities: Sequence[str]) -> dict:
    """One TrigramJudge per modality from the corpus's train split."""
    from unmask.corpus.shards import load_split

    train = load_split(corpus, "train")
    return {m: TrigramJudge(train[m], vocab_size) for m in modalities if m in train}
