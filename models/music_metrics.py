"""Symbolic-music statistics on MIDI files, for comparing generated pieces with held-out ones.

All functions are pure and take MIDI file bytes (or a list of `Note`s, to pool many files):

  * pitch-class histogram: 12 bins (C, C#, ..., B); by default every note counts once (a count
    histogram of onsets); `weighted=True` weights each note by its duration in beats instead.
  * note-duration histogram: 7 bins in beats (quarter note = 1 beat) with lower edges
    1/16, 1/8, 1/4, 1/2, 1, 2, 4: bin k holds durations in [edge_k, edge_k+1); the first bin also
    takes anything shorter than 1/16, the last is "4 beats or longer". A dotted quarter (1.5)
    lands in the "1" bin, a dotted half (3) in the "2" bin.
  * overlap_area(h1, h2) = sum_i min(p_i, q_i) of the two histograms normalised to sum 1:
    1.0 for identical distributions, 0.0 for disjoint ones (and 0.0 when either is empty).

Drum tracks are skipped: their "pitches" are instruments, not pitch classes or durations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from unmask.errors import MidiError

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
DURATION_EDGES = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0)  # lower bin edges, in beats
DURATION_LABELS = ("1/16", "1/8", "1/4", "1/2", "1", "2", "4+")


class Note(NamedTuple):
    track: int  # index of the (non-drum) track in the file
    start: int  # onset in ticks
    pitch: int  # MIDI pitch 0..127
    duration: int  # ticks
    beats: float  # duration in beats (quarter notes)


def read_notes(data: bytes) -> list[Note]:
    """All non-drum notes of a MIDI file, in track order. Raises MidiError for unreadable bytes."""
    import symusic  # late: symusic is only needed where MIDI is evaluated

    if not isinstance(data, bytes | bytearray) or bytes(data[:4]) != b"MThd":
        raise MidiError("not a MIDI file (no 'MThd' header)", field="midi")
    try:
        score = symusic.Score.from_midi(bytes(data))
    except Exception as exc:  # symusic raises RuntimeError (and others) on corrupt files
        raise MidiError(f"corrupt or truncated MIDI file: {exc}", field="midi") from exc
    tpq = max(int(score.tpq), 1)
    notes: list[Note] = []
    for k, track in enumerate(t for t in score.tracks if not t.is_drum):
        for n in track.notes:
            notes.append(Note(k, int(n.time), int(n.pitch), int(n.duration), n.duration / tpq))
    return notes


def has_notes(data: object) -> bool:
    """True when `data` is a readable MIDI file holding at least one note; never raises."""
    try:
        import symusic

        if not isinstance(data, bytes | bytearray) or bytes(data[:4]) != b"MThd":
            return False
        return symusic.Score.from_midi(bytes(data)).note_num() > 0
    except Exception:
        return False


def _notes(src: bytes | Sequence[Note]) -> Sequence[Note]:
    return read_notes(src) if isinstance(src, bytes | bytearray) else src


def pitch_class_histogram(src: bytes | Sequence[Note], *, weighted: bool = False) -> np.ndarray:
    """(12,) float64, normalised to sum 1 (all zeros without notes). Counts onsets by default;
    weighted=True weights each note by its duration in beats."""
    h = np.zeros(12, dtype=np.float64)
    for n in _notes(src):
        h[n.pitch % 12] += n.beats if weighted else 1.0
    total = h.sum()
    return h / total if total > 0 else h


def duration_bin(beats: float) -> int:
    """Index of the duration bin (see DURATION_EDGES) of a duration in beats."""
    return max(0, int(np.searchsorted(DURATION_EDGES, beats, side="right")) - 1)


def duration_histogram(src: bytes | Sequence[Note]) -> np.ndarray:
    """(7,) float64 note counts per duration bin, normalised to sum 1 (zeros without notes)."""
    h = np.zeros(len(DURATION_EDGES), dtype=np.float64)
    for n in _notes(src):
        h[duration_bin(n.beats)] += 1.0
    total = h.sum()
    return h / total if total > 0 else h


def overlap_area(h1: Sequence[float] | np.ndarray, h2: Sequence[float] | np.ndarray) -> float:
    """sum(min(p, q)) of two histograms after normalising each to sum 1: 1 = identical, 0 =
    disjoint (or either empty). Both must have the same number of bins."""
    p, q = np.asarray(h1, dtype=np.float64), np.asarray(h2, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"histograms of different shapes {p.shape} and {q.shape}")
    if (p < 0).any() or (q < 0).any():
        raise ValueError("histograms must be non-negative")
    sp, sq = p.sum(), q.sum()
    if sp <= 0 or sq <= 0:
        return 0.0
    return float(np.minimum(p / sp, q / sq).sum())
