"""MIDI part of the vocabulary: miditok's MMM tokenizer on a REMI base, plus its type grammar.

MMM writes one `Track_Start Program_p … Track_End` group per track, so a 4-voice chorale stays
4 tracks through encode → decode. Velocities are off by default: our sources (chorales, folk
tunes) have constant velocities, and dropping them makes note events 3 tokens instead of 4.
miditok's own PAD is never exposed: the unified vocabulary has one PAD and one MASK.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import symusic
from miditok import MMM, TokenizerConfig, TokSequence

from unmask.errors import MidiError

# Token types of the grammar. miditok names a type by the prefix before "_"; the two track
# delimiters get their own types because what may follow them differs.
TRACK_START, TRACK_END = "Track_Start", "Track_End"
# Structural types stay visible when bars or tracks are masked for infilling.
STRUCTURAL_TYPES = frozenset({TRACK_START, TRACK_END, "Program", "Bar", "TimeSig"})


@dataclass(frozen=True)
class MidiConfig:
    use_velocities: bool = False  # constant in our corpus; on costs 1 token per note
    num_velocities: int = 8
    positions_per_beat: int = 4  # 16th-note grid in 4/4
    pitch_range: tuple[int, int] = (21, 109)

    def tokenizer_config(self) -> TokenizerConfig:
        grid = {(0, 4): self.positions_per_beat, (4, 12): self.positions_per_beat // 2}
        return TokenizerConfig(
            pitch_range=self.pitch_range,
            beat_res=grid,
            use_velocities=self.use_velocities,
            num_velocities=self.num_velocities,
            use_programs=True,
            use_time_signatures=True,
            use_tempos=True,
            special_tokens=["PAD"],  # miditok insists on a PAD; it is dropped from our range
            base_tokenizer="REMI",
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pitch_range"] = list(self.pitch_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MidiConfig:
        return cls(**{**d, "pitch_range": tuple(d["pitch_range"])})


def token_type(token: str) -> str:
    if token in (TRACK_START, TRACK_END):
        return token
    return token.split("_", 1)[0]


class MidiCodec:
    """MIDI file bytes ↔ local MIDI ids (0..size-1, miditok ids without miditok's PAD)."""

    def __init__(self, config: MidiConfig | None = None) -> None:
        self.config = config or MidiConfig()
        self._tok = MMM(self.config.tokenizer_config())
        vocab = self._tok.vocab  # token string -> miditok id
        self._pad = vocab["PAD_None"]
        # local id i <-> miditok id, in miditok order, skipping its PAD.
        self.tokens: list[str] = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        self.tokens = [t for t in self.tokens if t != "PAD_None"]
        self._to_local = {vocab[t]: i for i, t in enumerate(self.tokens)}
        self._to_miditok = np.array([vocab[t] for t in self.tokens], dtype=np.int64)
        self.types: list[str] = sorted({token_type(t) for t in self.tokens})
        self.type_of_local = np.array(
            [self.types.index(token_type(t)) for t in self.tokens], dtype=np.int64
        )
        self.allowed_next = self._type_grammar()

    @property
    def size(self) -> int:
        return len(self.tokens)

    def _type_grammar(self) -> np.ndarray:
        """allowed_next[a, b]: a token of type b may follow a token of type a.

        From miditok's type graph, with its generic "Track" split: a Track_Start is always
        followed by a Program, a Track_End by the next Track_Start (or the end of the piece), and
        "Track" listed as a successor elsewhere means the Track_End that closes a track.
        """
        graph = self._tok.tokens_types_graph
        n = len(self.types)
        allowed = np.zeros((n, n), dtype=bool)
        index = {t: i for i, t in enumerate(self.types)}
        for src, successors in graph.items():
            if src not in index:
                continue
            for dst in successors:
                dst = TRACK_END if dst == "Track" else dst
                if dst in index:
                    allowed[index[src], index[dst]] = True
        allowed[index[TRACK_START], :] = False
        allowed[index[TRACK_START], index["Program"]] = True
        allowed[index[TRACK_END], :] = False
        allowed[index[TRACK_END], index[TRACK_START]] = True
        # MMM opens every track with `Track_Start Program_p Bar …`; REMI's graph lacks that edge.
        allowed[index["Program"], index["Bar"]] = True
        return allowed

    # ---- encode / decode -------------------------------------------------------------------
    def encode(self, data: bytes) -> list[int]:
        score = parse_midi(data)
        seq = self._tok.encode(score)
        seq = seq[0] if isinstance(seq, list) else seq
        ids = [self._to_local[i] for i in seq.ids if i != self._pad]
        if not ids:
            raise MidiError("the MIDI file produced no tokens", field="midi")
        return ids

    def decode(self, local_ids: list[int]) -> bytes:
        """Local ids → standard MIDI file bytes. Raises MidiError if no note comes out."""
        if not local_ids:
            raise MidiError("no MIDI tokens to decode", field="ids")
        ids = [int(i) for i in self._to_miditok[np.asarray(local_ids, dtype=np.int64)]]
        try:
            score = self._tok.decode(TokSequence(ids=ids))
        except Exception as exc:  # miditok raises many kinds on malformed sequences
            raise MidiError(f"MIDI tokens could not be decoded: {exc}", field="ids") from exc
        drop_duplicate_notes(score)
        if score.note_num() == 0:
            raise MidiError("the MIDI tokens decode to a piece without notes", field="ids")
        return bytes(score.dumps_midi())

    def save(self, path: str | Path) -> None:
        self._tok.save(Path(path))


def drop_duplicate_notes(score: symusic.Score) -> symusic.Score:
    """Keep the first of notes with the same pitch and onset in one track (in place).

    A generated sequence can repeat a pitch at one position (greedy decoding does, often); the
    copies are one sounding note written twice, which players render louder or drop anyway. The
    sampler's constraints avoid most of them; this is the guarantee for what they cannot see.
    """
    for track in score.tracks:
        seen: set[tuple[int, int]] = set()

        def first(note: symusic.Note, seen: set[tuple[int, int]] = seen) -> bool:
            key = (int(note.time), int(note.pitch))
            if key in seen:
                return False
            seen.add(key)
            return True

        track.notes.filter(first, inplace=True)
    return score


def parse_midi(data: bytes) -> symusic.Score:
    """Bytes → symusic Score with typed errors for the ways a file can be bad."""
    if not isinstance(data, bytes | bytearray) or len(data) == 0:
        raise MidiError("the MIDI file is empty", field="midi")
    if not bytes(data[:4]) == b"MThd":
        raise MidiError("not a MIDI file (no 'MThd' header)", field="midi")
    try:
        score = symusic.Score.from_midi(bytes(data))
    except Exception as exc:  # symusic raises RuntimeError on corrupt/truncated files
        raise MidiError(f"corrupt or truncated MIDI file: {exc}", field="midi") from exc
    if score.note_num() == 0:
        raise MidiError("the MIDI file has no notes", field="midi")
    return score
