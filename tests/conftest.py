from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def vocab():
    from unmask.tokenizers.vocab import UnifiedVocab

    return UnifiedVocab.load()


@pytest.fixture(scope="session")
def chorale_midi() -> bytes:
    """A 4-voice Bach chorale from music21's corpus, one program per voice."""
    import music21

    from unmask.corpus.sources import chorale_to_midi

    path = Path(music21.__file__).parent / "corpus" / "bach" / "bwv269.mxl"
    data = chorale_to_midi(path)
    assert data is not None
    return data


def save_tiny_model(directory: Path, vocab, causal: bool = False, max_seq_len: int = 256) -> Path:
    """A randomly initialised, tiny model with the shipped vocabulary (fast CPU tests)."""
    import torch

    from unmask.models import checkpoint
    from unmask.models.network import Denoiser, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab.size, d_model=32, n_layers=1, n_heads=2, max_seq_len=max_seq_len,
        causal=causal, mask_id=vocab.mask_id,
    )  # fmt: skip
    return checkpoint.save(directory, Denoiser(cfg), vocab)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, vocab) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-diffusion"), vocab)


@pytest.fixture(scope="session")
def tiny_ar_dir(tmp_path_factory, vocab) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-ar"), vocab, causal=True)


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
