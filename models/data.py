"""Training and evaluation batches from the tokenized corpus.

Every row is a fixed-length canvas of `seq_len` ids:

    [BOS, TAG_modality, content..., EOS, PAD, PAD, ...]

  * A document that fits is written whole, then EOS, then PAD up to seq_len.
  * A longer document gives a random window of the stream `content + EOS`; the window has no EOS
    unless it reaches the document's end.
  * A share of rows (`crop_share`) is cut to a random shorter length, keeping the document's *end*
    (a suffix), so the EOS is still a true end; the model thereby sees EOS + PAD tails at every
    length and learns where to stop, without ever being taught a false ending.

Targets and padding (the important design choice). BOS and the tag (positions 0, 1) are always
given: at sampling time the sampler writes them itself. Every later position is a target,
*including EOS and the PAD tail*, as in LLaDA: at sampling time the canvas after the prompt is all
MASK and the model itself must decide where the text stops by writing EOS and then PAD. So the PAD
tail is made of real tokens in the attention sense: it is attended to in training exactly as the
PAD tokens the model has already written are attended to while sampling. Attention padding
(`pad_mask` of the network) is only the batching padding between rows of different lengths, which
training never needs: all rows have length seq_len, hence `real_mask` is all True.

Conditioning variants (what the diffusion loss may mask), drawn per row:
  * prompt (`prompt_share`): a random content prefix stays visible (prefix completion);
  * infill (`infill_share`): only 1..3 random spans may be masked; for MIDI rows the structural
    tokens (bars, tracks, ...) stay visible too, i.e. bar/track infilling given the skeleton;
  * otherwise: unconditional generation (everything after BOS + tag may be masked).
The AR baseline uses the same rows with all positions >= 2 as targets, so both objectives see the
same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from unmask.corpus.shards import DocArray
from unmask.errors import InvalidArgument

PREFIX_LEN = 2  # BOS + modality tag: always given, never a target


@dataclass
class SpecialIds:
    pad: int
    mask: int
    bos: int
    eos: int
    tags: dict[str, int]  # modality -> id of its tag token

    @classmethod
    def from_vocab(
        cls, vocab, modalities: tuple[str, ...] = ("text", "code", "midi")
    ) -> SpecialIds:
        """From any object with pad_id/mask_id/bos_id/eos_id and tag_id(modality)."""
        tags = {m: int(vocab.tag_id(m)) for m in modalities}
        return cls(
            int(vocab.pad_id), int(vocab.mask_id), int(vocab.bos_id), int(vocab.eos_id), tags
        )


@dataclass
class Batch:
    ids: Tensor  # [B, T] long: BOS, TAG, content..., (EOS, PAD...)
    modalities: list[str]  # [B] modality of each row
    target_mask: Tensor  # [B, T] bool: positions the model learns to produce (>= 2, incl. EOS/PAD)
    real_mask: Tensor  # [B, T] bool: attention padding mask (True = real); all True in training
    prompt_len: Tensor  # [B] long: positions < prompt_len are given (2 = only BOS + TAG)
    spans: Tensor  # [B, T] bool: infill rows: only these may be masked; all True for other rows
    keep_structure: Tensor  # [B] bool: MIDI infill rows whose structural tokens stay visible
    doc_tokens: Tensor  # [B] long: content + EOS tokens in the row (per-token eval denominator)

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return Batch(**{**self.__dict__, **moved})

    def __len__(self) -> int:
        return self.ids.shape[0]


def format_row(
    content: np.ndarray, ends: bool, modality: str, special: SpecialIds, seq_len: int
) -> np.ndarray:
    """[BOS, TAG, content, EOS if ends, PAD...] as int64 [seq_len]; content must fit."""
    n = len(content) + PREFIX_LEN + int(ends)
    if n > seq_len:
        raise InvalidArgument(f"row of {n} ids does not fit seq_len {seq_len}", field="seq_len")
    row = np.full(seq_len, special.pad, dtype=np.int64)
    row[0], row[1] = special.bos, special.tags[modality]
    row[PREFIX_LEN : PREFIX_LEN + len(content)] = content
    if ends:
        row[PREFIX_LEN + len(content)] = special.eos
    return row


def _collate(
    rows: list[np.ndarray],
    modalities: list[str],
    doc_tokens: list[int],
    prompt_len: list[int] | None = None,
    spans: np.ndarray | None = None,
    keep: list[bool] | None = None,
) -> Batch:
    ids = torch.from_numpy(np.stack(rows))  # [B, T]
    B, T = ids.shape
    target = torch.zeros(B, T, dtype=torch.bool)
    target[:, PREFIX_LEN:] = True
    return Batch(
        ids=ids,
        modalities=modalities,
        target_mask=target,
        real_mask=torch.ones(B, T, dtype=torch.bool),
        prompt_len=torch.tensor(prompt_len or [PREFIX_LEN] * B, dtype=torch.long),
        spans=torch.from_numpy(spans) if spans is not None else torch.ones(B, T, dtype=torch.bool),
        keep_structure=torch.tensor(keep or [False] * B, dtype=torch.bool),
        doc_tokens=torch.tensor(doc_tokens, dtype=torch.long),
    )


class BatchSampler:
    """Endless, seedable stream of training batches drawn from several modalities.

    A row's modality is drawn with probability proportional to `weights`; within a modality a
    document is drawn with probability proportional to its length + 1 (token-uniform, so a long
    document is visited as often as its many windows deserve). All randomness comes from one numpy
    Generator whose state is saved with the training state (`state_dict`) for exact resumption.
    """

    def __init__(
        self,
        docs: dict[str, DocArray],
        special: SpecialIds,
        *,
        seq_len: int,
        batch_size: int,
        weights: dict[str, float] | None = None,
        crop_share: float = 0.05,
        prompt_share: float = 0.25,
        infill_share: float = 0.15,
        seed: int = 0,
    ) -> None:
        if seq_len < PREFIX_LEN + 2:
            raise InvalidArgument("seq_len must be at least 4", field="seq_len", value=seq_len)
        if batch_size < 1:
            raise InvalidArgument("batch_size must be >= 1", field="batch_size", value=batch_size)
        shares = {
            "crop_share": crop_share,
            "prompt_share": prompt_share,
            "infill_share": infill_share,
        }
        for name, v in shares.items():
            if not 0.0 <= v <= 1.0:
                raise InvalidArgument(f"{name} must lie in [0, 1]", field=name, value=v)
        if prompt_share + infill_share > 1.0:
            raise InvalidArgument("prompt_share + infill_share must be <= 1", field="infill_share")
        present = {m: d for m, d in docs.items() if len(d) > 0}
        weights = dict(weights) if weights is not None else {m: 1.0 for m in present}
        for m, w in weights.items():
            if w < 0:
                raise InvalidArgument(f"negative weight for {m}", field="modality_weights", value=w)
            if w > 0 and m not in present:
                raise InvalidArgument(
                    f"modality {m!r} has weight {w} but no training documents",
                    field="modality_weights",
                    value=m,
                )
        self.modalities = [m for m in present if weights.get(m, 0.0) > 0]
        if not self.modalities:
            raise InvalidArgument("no modality to sample from", field="modality_weights")
        p = np.array([weights[m] for m in self.modalities], dtype=np.float64)
        self.modality_p = p / p.sum()
        self.docs, self.special = present, special
        self.seq_len, self.batch_size = seq_len, batch_size
        self.crop_share = crop_share
        self.prompt_share, self.infill_share = prompt_share, infill_share
        # cumulative (length + 1) per document, for token-uniform document choice
        self._cum = {m: np.cumsum(np.diff(present[m].offsets) + 1) for m in self.modalities}
        self.rng = np.random.default_rng(seed)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def _window(self, doc: np.ndarray) -> tuple[np.ndarray, bool]:
        """Content of one row and whether it ends the document (then EOS follows)."""
        rng, cap, n = self.rng, self.seq_len - PREFIX_LEN, len(doc)
        if n >= 1 and rng.random() < self.crop_share:
            keep = int(rng.integers(1, min(n, cap - 1) + 1))  # shorter than the canvas, EOS fits
            return doc[n - keep :], True
        if n + 1 <= cap:
            return doc, True
        start = int(rng.integers(0, n + 1 - cap + 1))  # windows of content + EOS
        window = doc[start : start + cap]
        if len(window) < cap:  # the window reached the end: its last slot is the EOS
            return window, True
        return window, False

    def next_batch(self) -> Batch:
        rng, T = self.rng, self.seq_len
        rows, mods, doc_tokens, prompt_len, keep = [], [], [], [], []
        spans = np.ones((self.batch_size, T), dtype=bool)
        for b in range(self.batch_size):
            m = self.modalities[int(rng.choice(len(self.modalities), p=self.modality_p))]
            cum = self._cum[m]
            j = int(np.searchsorted(cum, rng.integers(0, cum[-1]), side="right"))
            content, ends = self._window(np.asarray(self.docs[m][j], dtype=np.int64))
            rows.append(format_row(content, ends, m, self.special, T))
            mods.append(m)
            n = len(content)
            doc_tokens.append(n + int(ends))

            plen, is_infill, u = PREFIX_LEN, False, rng.random()
            if u < self.prompt_share and n >= 2:
                plen = PREFIX_LEN + int(rng.integers(1, n))  # keep 1..n-1 content tokens visible
            elif self.prompt_share <= u < self.prompt_share + self.infill_share:
                is_infill = True
                region = n + int(ends)  # content + EOS: positions PREFIX_LEN .. PREFIX_LEN+region
                spans[b] = False
                for _ in range(int(rng.integers(1, 4))):
                    length = int(rng.integers(1, max(1, region // 2) + 1))
                    start = PREFIX_LEN + int(rng.integers(0, max(1, region - length + 1)))
                    spans[b, start : start + length] = True
            prompt_len.append(plen)
            keep.append(is_infill and m == "midi")
        return _collate(rows, mods, doc_tokens, prompt_len, spans, keep)


def eval_batches(
    docs: DocArray,
    modality: str,
    special: SpecialIds,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
) -> Iterator[Batch]:
    """Deterministic evaluation batches: documents in order, the first window of each, no crops,
    prompts or infill spans (so the numbers of two checkpoints are comparable)."""
    cap = seq_len - PREFIX_LEN
    n_docs = min(len(docs), batch_size * max_batches)
    for lo in range(0, n_docs, batch_size):
        rows, doc_tokens = [], []
        for j in range(lo, min(lo + batch_size, n_docs)):
            doc = np.asarray(docs[j], dtype=np.int64)
            ends = len(doc) + 1 <= cap
            content = doc if ends else doc[:cap]
            rows.append(format_row(content, ends, modality, special, seq_len))
            doc_tokens.append(len(content) + int(ends))
        yield _collate(rows, [modality] * len(rows), doc_tokens)
