"""The main job of `make demo`: show the unified vocabulary on text, code and a chorale."""

from __future__ import annotations

import sys
from pathlib import Path

from unmask.tokenizers.vocab import UnifiedVocab

SAMPLES = {
    "text": "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.",
    "code": "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n",
}


def main(out_dir: str = "out") -> int:
    vocab = UnifiedVocab.load()
    s = vocab.summary()
    print(
        f"vocabulary {s['content_hash']}: {s['size']} ids "
        f"({s['special']} special, {s['bpe']} BPE, {s['midi']} MIDI)"
    )
    for modality, text in SAMPLES.items():
        ids = vocab.encode(text, modality)
        assert vocab.decode(ids, modality) == text
        print(
            f"{modality}: {len(text.encode())} bytes -> {len(ids)} tokens "
            f"({len(text.encode()) / len(ids):.2f} bytes/token), exact round trip"
        )
    try:
        import music21

        from unmask.corpus.sources import chorale_to_midi
    except ImportError:
        print("midi: music21 not installed; skipped")
        return 0
    data = chorale_to_midi(Path(music21.__file__).parent / "corpus" / "bach" / "bwv269.mxl")
    ids = vocab.encode(data, "midi")
    out = Path(out_dir)
    out.mkdir(exist_ok=True)
    (out / "bwv269_roundtrip.mid").write_bytes(vocab.decode(ids, "midi"))
    print(
        f"midi: chorale BWV 269 -> {len(ids)} tokens, "
        f"{vocab.count_midi_type_errors(ids)} grammar errors; wrote {out / 'bwv269_roundtrip.mid'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
