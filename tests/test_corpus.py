"""`unmask data build --small`: shards, manifest with licences, splits, and no work twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unmask.corpus.build import BuildConfig, build, split_of
from unmask.corpus.shards import load_split, read_docs, write_docs
from unmask.corpus.sources import ALL_SOURCES
from unmask.errors import CorpusError


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    res = subprocess.run(
        [sys.executable, "-m", "unmask", "data", "build", "--small", "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    return out, json.loads((out / "manifest.json").read_text())


def test_small_build_covers_every_installed_source(small_corpus):
    _, manifest = small_corpus
    names = set(manifest["sources"]) | set(manifest["skipped"])
    assert names == {cls.name for cls in ALL_SOURCES}
    assert {"code", "midi"} <= {s["modality"] for s in manifest["sources"].values()}


def test_manifest_records_licence_and_counts_per_source(small_corpus):
    _, manifest = small_corpus
    for info in manifest["sources"].values():
        assert info["licence"] and info["origin"]
        docs = sum(info["splits"][s]["documents"] for s in ("train", "val", "test"))
        assert docs > 0
        assert sum(info["splits"][s]["tokens"] for s in ("train", "val", "test")) > docs


def test_shards_hold_ids_of_the_right_modality(small_corpus, vocab):
    out, _ = small_corpus
    train = load_split(out, "train")
    assert train
    for modality, docs in train.items():
        allowed = vocab.modality_mask(modality)
        for doc in docs:
            assert len(doc) and allowed[doc].all()


def test_rerun_does_no_work_twice(small_corpus):
    out, _ = small_corpus
    stamps = {p: p.stat().st_mtime_ns for p in (out / "raw").iterdir()}
    stamps |= {p: p.stat().st_mtime_ns for p in (out / "tok").rglob("stats.json")}
    manifest = build(BuildConfig(out_dir=out, small=True, progress=False))
    assert manifest["build_seconds"] < 30
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_split_is_decided_by_document_id_alone():
    fractions = (0.8, 0.1, 0.1)
    splits = [split_of("src", f"doc{i}", fractions) for i in range(2000)]
    assert splits == [split_of("src", f"doc{i}", fractions) for i in range(2000)]
    share = splits.count("train") / len(splits)
    assert 0.75 < share < 0.85


def test_unknown_source_is_a_typed_error(tmp_path):
    with pytest.raises(CorpusError, match="unknown source"):
        build(BuildConfig(out_dir=tmp_path, sources=["nope"], progress=False))


def test_shards_round_trip(tmp_path):
    docs = [[1, 2, 3], [], [7] * 5]
    write_docs(tmp_path / "x", docs)
    back = read_docs(tmp_path / "x")
    assert len(back) == 3 and [list(d) for d in back] == docs
    assert back.tokens.dtype == np.uint32
