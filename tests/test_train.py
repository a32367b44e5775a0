"""Training batches, the training loop (both objectives), resumption and the CLI config."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unmask.corpus.shards import load_split, write_docs
from unmask.errors import CheckpointError, InvalidArgument
from unmask.models import checkpoint
from unmask.models.data import BatchSampler, SpecialIds, eval_batches
from unmask.models.network import Denoiser, ModelConfig
from unmask.models.objective import ar_loss, diffusion_loss, mask_tokens, sample_t
from unmask.models.train import (
    STATE_FILE,
    TrainConfig,
    add_train_args,
    config_from_args,
    lr_at,
    train,
)

PAD, MASK, BOS, EOS = 0, 1, 2, 3
TAGS = {"text": 5, "code": 6, "midi": 7}
SPECIAL = SpecialIds(pad=PAD, mask=MASK, bos=BOS, eos=EOS, tags=TAGS)
V = 48


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run best on one thread


class FakeVocab:
    """A 48-id vocabulary with UnifiedVocab's special ids; ids 40..43 are MIDI structure."""

    pad_id, mask_id, bos_id, eos_id, sep_id = PAD, MASK, BOS, EOS, 4
    size = V
    content_hash = hashlib.sha256(b"fake-48").hexdigest()[:16]

    def tag_id(self, modality: str) -> int:
        return TAGS[modality]

    def midi_structural_mask(self) -> np.ndarray:
        mask = np.zeros(V, dtype=bool)
        mask[40:44] = True
        return mask

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.json").write_text("{}")
        return directory

    @classmethod
    def load(cls, directory: Path) -> FakeVocab:
        return cls()


def make_corpus(root: Path) -> Path:
    rng = np.random.default_rng(0)
    lengths = {"text": [3, 10, 25, 60, 0], "code": [5, 14, 40], "midi": [8, 30, 50]}
    for split in ("train", "val"):
        for modality, lens in lengths.items():
            docs = [rng.integers(8, 44, n).tolist() for n in lens]
            write_docs(root / split / modality, docs)
    return root


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus")


def is_slice_of(content: np.ndarray, doc: np.ndarray) -> bool:
    n = len(content)
    return n == 0 or any(np.array_equal(doc[i : i + n], content) for i in range(len(doc) - n + 1))


def test_batches_have_the_documented_row_format(corpus):
    docs = load_split(corpus, "train")
    sampler = BatchSampler(docs, SPECIAL, seq_len=24, batch_size=64, crop_share=0.2, seed=1)
    for _ in range(3):
        batch = sampler.next_batch()
        assert batch.ids.shape == (64, 24) and batch.ids.dtype == torch.long
        assert batch.real_mask.all(), "training rows have no attention padding"
        assert not batch.target_mask[:, :2].any() and batch.target_mask[:, 2:].all()
        for b, modality in enumerate(batch.modalities):
            row = batch.ids[b].numpy()
            assert row[0] == BOS and row[1] == TAGS[modality]
            eos = np.flatnonzero(row == EOS)
            if len(eos):  # EOS, then only PAD
                content, tail = row[2 : eos[0]], row[eos[0] + 1 :]
                assert len(eos) == 1 and (tail == PAD).all()
            else:  # a window inside a long document fills the whole canvas
                content = row[2:]
                assert PAD not in content
            assert batch.doc_tokens[b] == len(content) + len(eos)
            assert any(is_slice_of(content, np.asarray(d)) for d in docs[modality])
            plen = int(batch.prompt_len[b])
            assert 2 <= plen <= 2 + max(len(content) - 1, 0)
            assert not batch.spans[b, 2 + len(content) + len(eos) :].any() or batch.spans[b].all()
            assert not batch.keep_structure[b] or modality == "midi"


def test_cropped_rows_keep_the_true_document_end(corpus):
    docs = load_split(corpus, "train")
    sampler = BatchSampler(docs, SPECIAL, seq_len=24, batch_size=32, crop_share=1.0, seed=2)
    batch = sampler.next_batch()
    for b, modality in enumerate(batch.modalities):
        row = batch.ids[b].numpy()
        eos = np.flatnonzero(row == EOS)
        if len(row[2 : eos[0]]) == 0:
            continue  # the empty document
        content = row[2 : eos[0]]
        ends = [np.asarray(d)[-len(content) :] for d in docs[modality] if len(d) >= len(content)]
        assert any(np.array_equal(e, content) for e in ends)


def test_sampler_is_seedable_resumable_and_follows_modality_weights(corpus):
    docs = load_split(corpus, "train")
    kwargs = {"seq_len": 16, "batch_size": 8, "weights": {"text": 1.0, "code": 1.0, "midi": 0.0}}
    a, b = (
        BatchSampler(docs, SPECIAL, seed=5, **kwargs),
        BatchSampler(docs, SPECIAL, seed=5, **kwargs),
    )
    assert torch.equal(a.next_batch().ids, b.next_batch().ids)
    state = a.state_dict()
    expected = a.next_batch()
    c = BatchSampler(docs, SPECIAL, seed=99, **kwargs)
    c.load_state_dict(state)
    assert torch.equal(c.next_batch().ids, expected.ids)
    mods = {m for _ in range(10) for m in a.next_batch().modalities}
    assert mods == {"text", "code"}
    with pytest.raises(InvalidArgument):
        BatchSampler({"text": docs["text"]}, SPECIAL, seq_len=16, batch_size=2, weights={"code": 1})


def test_eval_batches_are_deterministic_whole_documents_first(corpus):
    docs = load_split(corpus, "val")["text"]
    batches = list(eval_batches(docs, "text", SPECIAL, seq_len=24, batch_size=2, max_batches=2))
    again = list(eval_batches(docs, "text", SPECIAL, seq_len=24, batch_size=2, max_batches=2))
    assert [len(b) for b in batches] == [2, 2]
    assert all(torch.equal(x.ids, y.ids) for x, y in zip(batches, again, strict=True))
    first = batches[0].ids[0].numpy()
    assert first[2:5].tolist() == np.asarray(docs[0]).tolist() and first[5] == EOS
    assert (batches[0].prompt_len == 2).all() and batches[0].spans.all()


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_a_tiny_model_overfits_one_batch(objective):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=V, d_model=32, n_layers=2, max_seq_len=16, causal=objective == "ar", mask_id=MASK
    )
    model = Denoiser(cfg)
    x = torch.randint(8, V, (4, 16), generator=torch.Generator().manual_seed(1))
    x[:, 0], x[:, 1] = BOS, TAGS["text"]
    x = x.repeat(8, 1)  # 4 sequences, 8 copies each: many t per sequence per step, less noise
    targets = torch.ones_like(x, dtype=torch.bool)
    targets[:, :2] = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(150):
        if objective == "ar":
            loss, _ = ar_loss(model(x)[0], x, targets)
        else:
            t = sample_t(len(x), 1e-3, g)
            xt, masked = mask_tokens(x, t, targets, MASK, g)
            loss, _ = diffusion_loss(model(xt)[0], x, masked, t, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < 0.3 * first, (first, last)


def tiny_config(corpus: Path, out: Path, **overrides) -> TrainConfig:
    base = {
        "corpus": str(corpus),
        "out": str(out),
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "seq_len": 24,
        "batch_size": 4,
        "grad_accum": 2,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "max_steps": 6,
        "eval_every": 3,
        "eval_batches": 1,
        "eval_samples": 2,
        "ckpt_every": 3,
        "log_every": 2,
        "num_threads": 1,
    }
    return TrainConfig.from_dict(base | overrides)


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_train_writes_a_loadable_model_directory(corpus, tmp_path, objective):
    out = train(
        tiny_config(corpus, tmp_path / objective, objective=objective),
        vocab=FakeVocab(),
        progress=False,
    )
    model, _, meta = checkpoint.load(out, vocab_loader=FakeVocab.load)
    assert model.config.causal == (objective == "ar") and model.config.mask_id == MASK
    assert meta["training"]["tokens_seen"] == 6 * 4 * 2 * 24 and meta["training"]["steps"] == 6
    assert set(meta["eval"]) == {"text", "code", "midi"}
    assert all(np.isfinite(v) and v > 0 for v in meta["eval"].values())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 6]
    assert (out / checkpoint.CARD).exists() and (out / STATE_FILE).exists()


def test_block_diffusion_trains_on_infill_rows_with_lengthened_gaps(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "bd", objective="block_diffusion", block_size=4,
                      prompt_share=0.0, infill_share=1.0, infill_longer=1.0,
                      span_end_weight=8.0)  # fmt: skip
    out = train(cfg, vocab=FakeVocab(), progress=False)
    model, _, meta = checkpoint.load(out, vocab_loader=FakeVocab.load)
    assert model.config.attention == "block_causal" and meta["training"]["steps"] == 6
    assert all(np.isfinite(v) and v > 0 for v in meta["eval"].values())
    with pytest.raises(InvalidArgument) as err:
        TrainConfig(infill_longer=1.5)
    assert err.value.field == "infill_longer"
    with pytest.raises(InvalidArgument) as err:
        TrainConfig(span_end_weight=0.0)
    assert err.value.field == "span_end_weight"


def test_resumed_training_continues_from_the_saved_step_exactly(corpus, tmp_path):
    vocab = FakeVocab()
    whole = train(tiny_config(corpus, tmp_path / "whole"), vocab=vocab, progress=False)
    split_cfg = tiny_config(corpus, tmp_path / "split")
    train(split_cfg, vocab=vocab, progress=False, stop_at=3)
    state = torch.load(tmp_path / "split" / STATE_FILE, weights_only=True)
    assert state["step"] == 3 and state["tokens_seen"] == 3 * 4 * 2 * 24
    resumed = train(split_cfg, vocab=vocab, progress=False)
    a, _, meta_a = checkpoint.load(whole, vocab_loader=FakeVocab.load)
    b, _, meta_b = checkpoint.load(resumed, vocab_loader=FakeVocab.load)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)
    assert meta_b["training"]["steps"] == 6
    assert meta_b["training"]["tokens_seen"] == meta_a["training"]["tokens_seen"]


def test_resuming_into_a_directory_of_another_model_is_refused(corpus, tmp_path):
    train(tiny_config(corpus, tmp_path / "run", max_steps=3), vocab=FakeVocab(), progress=False)
    with pytest.raises(CheckpointError):
        train(tiny_config(corpus, tmp_path / "run", d_model=64), vocab=FakeVocab(), progress=False)


def test_learning_rate_warms_up_linearly_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert TrainConfig(max_tokens=1000, batch_size=2, grad_accum=2, seq_len=100).total_steps == 3


def test_cli_flags_override_the_json_config(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"max_steps": 100, "lr": 0.01, "objective": "ar"}))
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    args = parser.parse_args(
        ["--config", str(path), "--max-steps", "7", "--modality-weights", "text=1,code=0.5"]
    )
    cfg = config_from_args(args)
    assert (cfg.max_steps, cfg.lr, cfg.objective) == (7, 0.01, "ar")
    assert cfg.modality_weights == {"text": 1.0, "code": 0.5}
    assert args.func.__name__ == "run_train"
    path.write_text(json.dumps({"max_step": 1}))
    with pytest.raises(InvalidArgument):
        config_from_args(parser.parse_args(["--config", str(path)]))
