"""MIDI through the unified vocabulary: chorales survive, bad files get typed errors."""

from __future__ import annotations

from collections import Counter

import mido
import numpy as np
import pytest
import symusic

from unmask.errors import MidiError
from unmask.tokenizers.specials import NUM_SPECIAL


def _notes(data: bytes) -> dict[int, Counter]:
    """program -> multiset of (pitch, onset in 16ths) on the tokenizer's 16th-note grid."""
    score = symusic.Score.from_midi(data)
    out: dict[int, Counter] = {}
    for track in score.tracks:
        if not track.notes:
            continue  # the conductor track (tempo, meter) holds no notes
        c = out.setdefault(track.program, Counter())
        for n in track.notes:
            c[(n.pitch, round(n.time / score.ticks_per_quarter * 4))] += 1
    return out


def test_four_voice_chorale_keeps_its_tracks_and_notes(vocab, chorale_midi):
    ids = vocab.encode_midi(chorale_midi)
    back = vocab.decode(ids, "midi")
    original, decoded = _notes(chorale_midi), _notes(back)
    assert len(decoded) == len(original) >= 4
    assert decoded == original


def test_decoded_midi_is_a_standard_file_mido_reads(vocab, chorale_midi):
    back = vocab.decode(vocab.encode_midi(chorale_midi), "midi")
    import io

    mid = mido.MidiFile(file=io.BytesIO(back))
    assert sum(1 for t in mid.tracks for m in t if m.type == "note_on" and m.velocity > 0) > 50


def test_midi_ids_live_in_their_own_range_without_a_second_pad(vocab, chorale_midi):
    ids = vocab.encode_midi(chorale_midi)
    assert min(ids) >= vocab.ranges.midi_start and max(ids) < vocab.ranges.midi_end
    assert "PAD_None" not in vocab.midi.tokens
    assert all(i >= NUM_SPECIAL for i in ids)


def test_chorale_tokens_follow_the_type_grammar(vocab, chorale_midi):
    ids = vocab.encode_midi(chorale_midi)
    assert vocab.count_midi_type_errors(ids) == 0


def test_grammar_errors_are_counted(vocab, chorale_midi):
    ids = vocab.encode_midi(chorale_midi)
    broken = ids[:10] + [ids[0]] + ids[10:]  # a Track_Start in the middle of a track
    assert vocab.count_midi_type_errors(broken) >= 1
    assert vocab.count_midi_type_errors([*ids[:5], vocab.encode_text("x")[0]]) == 1


def test_next_mask_follows_the_grammar(vocab, chorale_midi):
    ids = vocab.encode_midi(chorale_midi)
    for prev, nxt in zip(ids[:199], ids[1:200], strict=True):
        mask = vocab.midi_next_mask(prev)
        assert mask[nxt]
        assert not mask[vocab.mask_id]
    type_of = vocab.midi_type_of_id()
    assert (type_of[: vocab.ranges.midi_start] == -1).all()


def test_structural_mask_marks_bars_tracks_programs(vocab):
    structural = vocab.midi_structural_mask()
    names = {vocab.token_str(i).split("_")[0] for i in np.flatnonzero(structural)}
    assert names == {"Track", "Program", "Bar", "TimeSig"}


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"RIFF0000WAVEfmt ", "not a MIDI file"),
        (b"MThd\x00\x00\x00\x06\x00\x01\x00\x02\x01", "corrupt or truncated"),
    ],
)
def test_bad_midi_bytes_are_typed_errors(vocab, data, message):
    with pytest.raises(MidiError, match=message):
        vocab.encode(data, "midi")


def test_truncated_chorale_is_a_typed_error_or_still_valid(vocab, chorale_midi):
    for cut in (20, 100, len(chorale_midi) // 2):
        try:
            ids = vocab.encode(chorale_midi[:cut], "midi")
        except MidiError:
            continue
        assert ids  # never a silent empty result


def test_midi_without_notes_is_refused(vocab):
    mid = mido.MidiFile()
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000)])
    mid.tracks.append(track)
    import io

    buf = io.BytesIO()
    mid.save(file=buf)
    with pytest.raises(MidiError, match="no notes"):
        vocab.encode(buf.getvalue(), "midi")


def test_text_given_as_midi_is_refused(vocab):
    with pytest.raises(MidiError, match="file bytes"):
        vocab.encode("not bytes", "midi")


def test_ids_decoding_to_no_notes_are_refused(vocab):
    track_start = vocab.ranges.midi_start + vocab.midi.tokens.index("Track_Start")
    with pytest.raises(MidiError, match="without notes|could not be decoded"):
        vocab.decode([track_start], "midi")
