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
