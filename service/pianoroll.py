"""A piano roll of a MIDI file as a PNG (`unmask midi --png`), with no plotting library.

Time runs left to right (one column per 16th note at the file's resolution), pitch bottom to
top (one row per semitone over the notes' range), one colour per track, bar lines in grey.
The PNG is written with zlib + struct.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import mido

COLOURS = [(230, 80, 60), (60, 140, 230), (70, 180, 90), (240, 170, 40), (150, 90, 200),
           (40, 180, 180), (220, 90, 160), (120, 120, 120)]  # fmt: skip
BACKGROUND, GRID, ROW_ALT = (255, 255, 255), (200, 200, 200), (246, 246, 246)


def notes(midi: bytes) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """(track, pitch, start tick, end tick) of every note; ticks per beat; beats per bar."""
    mf = mido.MidiFile(file=io.BytesIO(midi))
    out: list[tuple[int, int, int, int]] = []
    beats_per_bar = 4
    for t, track in enumerate(mf.tracks):
        now, on = 0, {}
        for msg in track:
            now += msg.time
            if msg.type == "time_signature":
                beats_per_bar = msg.numerator * 4 // msg.denominator or 1
            elif msg.type == "note_on" and msg.velocity > 0:
                on.setdefault((msg.channel, msg.note), now)
            elif msg.type in ("note_off", "note_on"):
                start = on.pop((msg.channel, msg.note), None)
                if start is not None:
                    out.append((t, msg.note, start, max(now, start + 1)))
    return out, mf.ticks_per_beat, beats_per_bar


def render(midi: bytes, cell: int = 4, row: int = 4) -> bytes:
    """PNG bytes of the piano roll."""
    ns, tpb, bpb = notes(midi)
    step = max(1, tpb // 4)  # one column per 16th note
    if ns:
        lo, hi = min(n[1] for n in ns), max(n[1] for n in ns)
        end = max(n[3] for n in ns)
    else:
        lo, hi, end = 60, 72, tpb * 4
    lo, hi = lo - 2, hi + 2
    cols = -(-end // step) + 1
    width, height = cols * cell, (hi - lo + 1) * row
    px = [[BACKGROUND] * width for _ in range(height)]
    for p in range(lo, hi + 1):  # black-key rows shaded
        if p % 12 in (1, 3, 6, 8, 10):
            y0 = (hi - p) * row
            for y in range(y0, y0 + row):
                px[y] = [ROW_ALT] * width
    bar_cols = 16 * bpb // 4 or 16
    for c in range(0, cols, bar_cols):
        for y in range(height):
            px[y][c * cell] = GRID
    for track, pitch, start, stop in ns:
        colour = COLOURS[track % len(COLOURS)]
        y0 = (hi - pitch) * row
        x0, x1 = start // step * cell, max(start // step * cell + 1, stop // step * cell - 1)
        for y in range(y0 + 1, y0 + row):
            for x in range(x0, min(x1, width)):
                px[y][x] = colour
    return _png(px)


def _png(px: list[list[tuple[int, int, int]]]) -> bytes:
    height, width = len(px), len(px[0])
    raw = b"".join(b"\x00" + bytes(v for rgb in r for v in rgb) for r in px)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))  # fmt: skip


def write_png(midi: bytes, path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(render(midi))
    return path
