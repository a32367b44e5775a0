"""Tokenized corpus shards: one flat uint32 token file plus document offsets per (split, modality).

Layout of a built corpus directory::

    manifest.json
    train/text.bin  train/text.idx     # .bin: uint32 ids of all documents back to back
    train/code.bin  ...                # .idx: int64 offsets, len = n_docs + 1
    val/...  test/...

Documents hold only content ids (no BOS/EOS/tags); the training data pipeline adds those.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
MODALITIES = ("text", "code", "midi")


@dataclass
class DocArray:
    """Read-only view of the documents of one (split, modality): memory-mapped, indexable."""

    tokens: np.ndarray  # (total_tokens,) uint32
    offsets: np.ndarray  # (n_docs + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])


def write_docs(path_stem: Path, docs: Sequence[Sequence[int]]) -> None:
    """Write documents to `<stem>.bin` / `<stem>.idx` (atomically, via temporary names)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = (
        np.concatenate([np.asarray(d, dtype=np.uint32) for d in docs])
        if docs
        else np.zeros(0, dtype=np.uint32)
    )
    for suffix, arr in ((".bin", flat), (".idx", offsets)):
        tmp = path_stem.with_suffix(suffix + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(arr.tobytes())
        tmp.replace(path_stem.with_suffix(suffix))


def read_docs(path_stem: Path) -> DocArray:
    bin_path, idx_path = path_stem.with_suffix(".bin"), path_stem.with_suffix(".idx")
    offsets = np.fromfile(idx_path, dtype=np.int64)
    if bin_path.stat().st_size == 0:
        tokens = np.zeros(0, dtype=np.uint32)
    else:
        tokens = np.memmap(bin_path, dtype=np.uint32, mode="r")
    return DocArray(tokens=tokens, offsets=offsets)


def load_split(corpus_dir: str | Path, split: str) -> dict[str, DocArray]:
    """All modalities present in one split of a built corpus, e.g. load_split(d, "train")["code"]."""
    root = Path(corpus_dir) / split
    out: dict[str, DocArray] = {}
    for modality in MODALITIES:
        stem = root / modality
        if stem.with_suffix(".idx").exists():
            out[modality] = read_docs(stem)
    return out
