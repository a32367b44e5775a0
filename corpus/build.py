"""`unmask data build`: raw documents → (optionally) a new vocabulary → tokenized shards.

Every stage caches its output under the corpus directory, so a re-run does no work twice:
    raw/<source>[.small].jsonl.gz        documents as read from the installed packages
    tok/<vocab hash>/<source>/<split>.*  token shards of one source under one vocabulary
    <split>/<modality>.bin|.idx          what training reads (merged per modality)
    manifest.json                        sources, licences, documents and tokens per split
Documents go to train/val/test by a hash of their id, so the split never depends on order.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from unmask.corpus.shards import MODALITIES, SPLITS, DocArray, read_docs, write_docs
from unmask.corpus.sources import ALL_SOURCES, Document, Source
from unmask.errors import CorpusError, TokenizerError
from unmask.tokenizers.midi import MidiCodec
from unmask.tokenizers.text_bpe import TextBPE, train_bpe
from unmask.tokenizers.vocab import UnifiedVocab

SMALL_LIMIT = 6  # documents per source in --small mode (tests)


@dataclass
class BuildConfig:
    out_dir: Path = Path("data/corpus")
    vocab_dir: Path | None = None  # None: the shipped vocabulary (unless train_vocab)
    train_vocab: bool = False  # train a new BPE on this corpus and save it to vocab_dir
    bpe_size: int = 8192
    small: bool = False
    sources: list[str] | None = None  # names; None = all
    split_fractions: tuple[float, float, float] = (0.96, 0.02, 0.02)
    progress: bool = True
    log: list[str] = field(default_factory=list)


def split_of(source: str, doc_id: str, fractions: tuple[float, float, float]) -> str:
    h = int.from_bytes(hashlib.sha256(f"{source}/{doc_id}".encode()).digest()[:8], "big")
    u = h / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


# ---- stage 1: raw documents ------------------------------------------------------------------
def _raw_path(cfg: BuildConfig, source: Source) -> Path:
    return cfg.out_dir / "raw" / f"{source.name}{'.small' if cfg.small else ''}.jsonl.gz"


def collect_raw(cfg: BuildConfig, source: Source) -> Path:
    path = _raw_path(cfg, source)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    limit = SMALL_LIMIT if cfg.small else None
    with gzip.open(tmp, "wt", encoding="utf-8") as fh:
        docs = source.documents(limit=limit)
        for doc in tqdm(docs, desc=f"read {source.name}", disable=not cfg.progress, unit="doc"):
            if isinstance(doc.content, bytes):
                record = {"id": doc.doc_id, "midi_b64": base64.b64encode(doc.content).decode()}
            else:
                record = {"id": doc.doc_id, "text": doc.content}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)  # only a complete file counts as done
    return path


def read_raw(path: Path) -> Iterator[Document]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            content = base64.b64decode(r["midi_b64"]) if "midi_b64" in r else r["text"]
            yield Document(r["id"], content)


# ---- stage 2: vocabulary ---------------------------------------------------------------------
def train_vocabulary(cfg: BuildConfig, raw: dict[str, tuple[Source, Path]]) -> UnifiedVocab:
    def texts() -> Iterator[str]:
        for source, path in raw.values():
            if source.modality == "midi":
                continue
            for doc in read_raw(path):
                if split_of(source.name, doc.doc_id, cfg.split_fractions) == "train":
                    yield doc.content  # type: ignore[misc]

    bpe = TextBPE(train_bpe(texts(), cfg.bpe_size, show_progress=cfg.progress))
    vocab = UnifiedVocab(bpe, MidiCodec())
    vocab.save(cfg.vocab_dir or cfg.out_dir / "vocab")
    return vocab


# ---- stage 3: tokenize -----------------------------------------------------------------------
def tokenize_source(
    cfg: BuildConfig, vocab: UnifiedVocab, source: Source, raw_path: Path
) -> dict[str, dict]:
    """Shards of one source under one vocabulary; returns per-split statistics."""
    out = cfg.out_dir / "tok" / vocab.content_hash / (source.name + (".small" if cfg.small else ""))
    stats_path = out / "stats.json"
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    docs: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
    stats = {s: {"documents": 0, "tokens": 0, "bytes": 0, "skipped": 0} for s in SPLITS}
    for doc in tqdm(read_raw(raw_path), desc=f"tokenize {source.name}", disable=not cfg.progress):
        split = split_of(source.name, doc.doc_id, cfg.split_fractions)
        try:
            ids = vocab.encode(doc.content, source.modality)
        except TokenizerError:
            stats[split]["skipped"] += 1  # e.g. a tune whose notes fall outside the pitch range
            continue
        if not ids:
            continue
        docs[split].append(ids)
        size = len(doc.content) if isinstance(doc.content, bytes) else len(doc.content.encode())
        stats[split]["documents"] += 1
        stats[split]["tokens"] += len(ids)
        stats[split]["bytes"] += size
    for split in SPLITS:
        write_docs(out / split, docs[split])
    stats_path.write_text(json.dumps(stats, indent=2))
    return stats


def merge_modalities(cfg: BuildConfig, vocab: UnifiedVocab, names: list[str]) -> None:
    base = cfg.out_dir / "tok" / vocab.content_hash
    suffix = ".small" if cfg.small else ""
    by_modality = {m: [n for n, mod in names if mod == m] for m in MODALITIES}  # type: ignore[misc]
    for split in SPLITS:
        for modality, sources in by_modality.items():
            parts: list[DocArray] = [read_docs(base / (s + suffix) / split) for s in sources]
            if not parts:
                continue
            write_docs(cfg.out_dir / split / modality, [d for p in parts for d in p])


def build(cfg: BuildConfig) -> dict:
    start = time.perf_counter()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(cfg.sources) if cfg.sources else None
    known = {s.name for s in ALL_SOURCES}
    if wanted and wanted - known:
        bad = sorted(wanted - known)[0]
        raise CorpusError(
            f"unknown source {bad!r}; known: {', '.join(sorted(known))}", field="sources"
        )
    raw: dict[str, tuple[Source, Path]] = {}
    skipped: dict[str, str] = {}
    for cls in ALL_SOURCES:
        source = cls()
        if wanted and source.name not in wanted:
            continue
        reason = source.missing()
        if reason:
            skipped[source.name] = reason
            cfg.log.append(f"skipping {source.name}: {reason}")
            continue
        raw[source.name] = (source, collect_raw(cfg, source))
    if not raw:
        raise CorpusError("no corpus source is available", field="sources")

    if cfg.train_vocab:
        vocab = train_vocabulary(cfg, raw)
    else:
        vocab = UnifiedVocab.load(cfg.vocab_dir)

    per_source = {}
    for name, (source, path) in raw.items():
        splits = tokenize_source(cfg, vocab, source, path)
        per_source[name] = {
            "modality": source.modality,
            "licence": source.licence,
            "origin": source.origin,
            "splits": splits,
        }
    merge_modalities(cfg, vocab, [(n, s["modality"]) for n, s in per_source.items()])
    vocab.save(cfg.out_dir / "vocab")  # the corpus carries the vocabulary it was cut with
    manifest = {
        "vocab": vocab.summary(),
        "small": cfg.small,
        "split_fractions": list(cfg.split_fractions),
        "sources": per_source,
        "skipped": skipped,
        "totals": _totals(per_source),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (cfg.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _totals(per_source: dict) -> dict:
    totals: dict[str, dict[str, int]] = {}
    for info in per_source.values():
        m = totals.setdefault(info["modality"], {s: 0 for s in SPLITS})
        for split in SPLITS:
            m[split] += info["splits"][split]["tokens"]
    return totals
