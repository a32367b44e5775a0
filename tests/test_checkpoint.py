"""Model directories: exact round trip, tied weights stored once, wrong tokenizer refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unmask.errors import CheckpointError, VocabMismatch
from unmask.models import checkpoint
from unmask.models.network import Denoiser, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run best on one thread


class FakeVocab:
    """The part of UnifiedVocab a checkpoint needs: a size, a content hash, save/load."""

    def __init__(self, size: int = 50, salt: str = "") -> None:
        self.size, self.salt = size, salt
        self.content_hash = hashlib.sha256(f"{size}:{salt}".encode()).hexdigest()[:16]

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.json").write_text(json.dumps({"size": self.size, "salt": self.salt}))
        return directory

    @classmethod
    def load(cls, directory: Path) -> FakeVocab:
        return cls(**json.loads((directory / "vocab.json").read_text()))


def tiny(causal: bool = False) -> Denoiser:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50, d_model=32, n_layers=2, max_seq_len=32, causal=causal, mask_id=1
    )
    return Denoiser(cfg).eval()


META = {
    "name": "tiny",
    "training": {"steps": 3, "tokens_seen": 1536, "wall_time_s": 12.5, "hardware": "CPU"},
    "eval": {"text": 2.5},
    "data": "- text: toy corpus (CC0)",
}


@pytest.mark.parametrize("causal", [False, True])
def test_round_trip_gives_identical_logits(tmp_path, causal):
    model = tiny(causal)
    checkpoint.save(tmp_path / "m", model, FakeVocab(), META)
    loaded, vocab, meta = checkpoint.load(tmp_path / "m", vocab_loader=FakeVocab.load)
    x = torch.randint(2, 50, (2, 12))
    assert torch.equal(loaded.logits(x), model.logits(x))
    assert loaded.config == model.config and not loaded.training
    assert loaded.head.weight is loaded.tok_emb.weight  # still tied after loading
    assert vocab.content_hash == FakeVocab().content_hash
    assert meta["objective"] == ("ar" if causal else "diffusion")
    assert meta["training"]["tokens_seen"] == 1536


def test_tied_embedding_is_stored_once_and_bf16_halves_the_file(tmp_path):
    model = tiny()
    checkpoint.save(tmp_path / "fp32", model, FakeVocab(), META)
    checkpoint.save(tmp_path / "bf16", model, FakeVocab(), META, weights_dtype="bfloat16")
    stored = load_file(str(tmp_path / "fp32" / checkpoint.WEIGHTS))
    assert "tok_emb.weight" in stored and "head.weight" not in stored
    assert sum(t.numel() for t in stored.values()) == model.num_parameters()
    size = {d: (tmp_path / d / checkpoint.WEIGHTS).stat().st_size for d in ("fp32", "bf16")}
    assert size["bf16"] < 0.55 * size["fp32"]
    loaded, _, _ = checkpoint.load(tmp_path / "bf16", vocab_loader=FakeVocab.load)
    x = torch.randint(2, 50, (1, 10))
    torch.testing.assert_close(loaded.logits(x), model.logits(x), atol=0.05, rtol=0.05)


def test_a_tokenizer_with_another_content_hash_is_refused(tmp_path):
    checkpoint.save(tmp_path, tiny(), FakeVocab(), META)
    FakeVocab(salt="retrained").save(tmp_path / "vocab")  # someone swapped the tokenizer files
    with pytest.raises(VocabMismatch, match="not the one this model was trained with"):
        checkpoint.load(tmp_path, vocab_loader=FakeVocab.load)


def test_a_tokenizer_of_another_size_is_refused(tmp_path):
    model = tiny()
    checkpoint.save(tmp_path, model, FakeVocab(size=60), META)
    with pytest.raises(VocabMismatch):
        checkpoint.load(tmp_path, vocab_loader=FakeVocab.load)


def test_missing_or_damaged_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "nowhere", vocab_loader=FakeVocab.load)
    checkpoint.save(tmp_path, tiny(), FakeVocab(), META)
    (tmp_path / checkpoint.WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path, vocab_loader=FakeVocab.load)


def test_model_card_reports_data_tokens_hardware_wall_time_and_evals(tmp_path):
    checkpoint.save(tmp_path, tiny(), FakeVocab(), META)
    card = (tmp_path / checkpoint.CARD).read_text()
    for expected in ("toy corpus (CC0)", "1,536", "CPU", "12 s", "| text | 2.5000 |", "NELBO"):
        assert expected in card
    config = json.loads((tmp_path / checkpoint.CONFIG).read_text())
    assert config["vocab_content_hash"] == FakeVocab().content_hash
    assert config["model"]["d_model"] == 32
