"""MIDI requests as a user sends them to the shipped model: continuing a file, settings (tempo,
time signature, voices, bars) that hold in the output, no duplicate notes, and limits that name
the field at fault instead of failing later or cutting the prompt silently."""

from __future__ import annotations

import io
from collections import Counter

import mido
import pytest

from unmask.engine.request import GenerationRequest, MidiSettings
from unmask.errors import InvalidArgument
from unmask.models.generation import Generator
from unmask.models.sampler_params import SamplerParams

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models run best on one thread

TICKS = 480
MODEL_CHOICES = ("steps", "position_score", "temperature", "top_p")  # the model's defaults


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator.load()


def greedy(n: int, **kw) -> SamplerParams:
    # the model's own position order and step count, greedy so a run is reproducible
    return SamplerParams(gen_length=n, temperature=0.0, unset=("steps", "position_score"), **kw)


def melody(pitches: list[int], tempo_bpm: float = 100.0, program: int = 73) -> bytes:
    """One track of quarter notes in 4/4 (on the tokenizer's grid, so it round-trips)."""
    mid = mido.MidiFile(ticks_per_beat=TICKS)
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("time_signature", numerator=4, denominator=4, time=0))
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo_bpm), time=0))
    track.append(mido.Message("program_change", program=program, channel=program % 16, time=0))
    for p in pitches:
        ch = program % 16
        track.append(mido.Message("note_on", note=p, velocity=80, channel=ch, time=0))
        track.append(mido.Message("note_off", note=p, velocity=0, channel=ch, time=TICKS))
    mid.tracks.append(track)
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


def merge(*files: bytes) -> bytes:
    """One file with the tracks of several (same ticks per beat)."""
    mid = mido.MidiFile(ticks_per_beat=TICKS)
    for data in files:
        mid.tracks += mido.MidiFile(file=io.BytesIO(data)).tracks
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


def notes(data: bytes) -> list[tuple[int, float, int]]:
    """(track, onset in beats, pitch) of every note-on."""
    mid = mido.MidiFile(file=io.BytesIO(data))
    out = []
    for ti, track in enumerate(mid.tracks):
        now = 0
        for m in track:
            now += m.time
            if m.type == "note_on" and m.velocity > 0:
                out.append((ti, now / mid.ticks_per_beat, m.note))
    return out


def meta(data: bytes, kind: str) -> list[mido.MetaMessage]:
    return [m for t in mido.MidiFile(file=io.BytesIO(data)).tracks for m in t if m.type == kind]


def run(gen: Generator, **request) -> bytes:
    out = gen.run(gen.prepare(GenerationRequest(modality="midi", **request))).output
    assert isinstance(out, bytes)
    return out


# ---- 1. continuing a file -----------------------------------------------------------------------


@pytest.mark.parametrize("stop_at_eos", [True, False])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "model-defaults"])
def test_continuing_a_midi_file_adds_notes_after_its_last_note(gen, stop_at_eos, sampled):
    prompt = melody([60, 62, 64, 65, 67, 69, 71, 72])  # two bars
    params = (
        SamplerParams(gen_length=64, seed=0, stop_at_eos=stop_at_eos, unset=MODEL_CHOICES)
        if sampled
        else greedy(64, stop_at_eos=stop_at_eos)
    )
    result = gen.run(gen.prepare(GenerationRequest(modality="midi", midi=prompt, params=params)))
    before, after = notes(prompt), notes(result.output)
    assert result.generated_tokens >= 32 and result.finish_reason == "length"
    assert {n[1:] for n in before} <= {n[1:] for n in after}  # the file's notes stay
    # the piece goes on: its own voice plays after its last note (no EOS, no new voice instead)
    last = max(onset for _, onset, _ in before)
    assert {t for t, _, _ in after} == {t for t, _, _ in before}
    assert any(onset > last for _, onset, _ in after)


def test_continuing_a_two_track_file_adds_notes_to_both_tracks(gen):
    upper = melody([72, 74, 76, 77, 79, 77, 76, 74])
    lower = melody([48, 55, 52, 55, 48, 53, 55, 43], program=42)
    prompt = merge(upper, lower)
    out = run(gen, midi=prompt, params=greedy(96))
    before, after = notes(prompt), notes(out)
    last = max(onset for _, onset, _ in before)
    new_by_track = Counter(t for t, onset, _ in after if onset > last)
    assert len(new_by_track) == 2  # both voices go on
    assert {n[1:] for n in before} <= {n[1:] for n in after}


def test_continuing_a_file_too_long_for_the_window_names_the_midi(gen):
    prompt = melody([60 + (i % 12) for i in range(200)])
    with pytest.raises(InvalidArgument) as err:
        gen.prepare(GenerationRequest(modality="midi", midi=prompt, params=greedy(64)))
    assert err.value.field == "midi"
    assert f"{gen.max_len}-token window" in str(err.value)


# ---- 2. the requested tempo and time signature hold ---------------------------------------------


def test_requested_tempo_and_time_signature_are_the_only_ones(gen):
    settings = MidiSettings(tempo=96, time_signature="3/4", voices=2, bars=4)
    tokens = [t for t in gen.vocab.midi.tokens if t.startswith("Tempo_")]
    nearest = min((float(t.split("_")[1]) for t in tokens), key=lambda b: abs(b - 96))
    for seed in range(2):
        params = SamplerParams(gen_length=160, temperature=1.2, top_p=0.95, seed=seed,
                               unset=("steps", "position_score"))  # fmt: skip
        out = run(gen, midi_settings=settings, params=params)
        tempos = meta(out, "set_tempo")
        assert len(tempos) == 1
        assert mido.tempo2bpm(tempos[0].tempo) == pytest.approx(nearest, abs=0.05)
        sigs = {(m.numerator, m.denominator) for m in meta(out, "time_signature")}
        assert sigs == {(3, 4)}


def test_continuation_keeps_the_file_tempo(gen):
    prompt = melody([60, 64, 67, 72, 67, 64, 60, 62], tempo_bpm=100)
    params = SamplerParams(gen_length=96, temperature=1.2, top_p=0.95, seed=3,
                           unset=("steps", "position_score"))  # fmt: skip
    out = run(gen, midi=prompt, params=params)
    assert len({m.tempo for m in meta(out, "set_tempo")}) == 1
    assert {(m.numerator, m.denominator) for m in meta(out, "time_signature")} == {(4, 4)}


# ---- 3. no duplicate notes ----------------------------------------------------------------------


@pytest.mark.parametrize("voices", [1, 2])
def test_greedy_midi_has_no_duplicate_notes(gen, voices):
    settings = MidiSettings(tempo=96, voices=voices, bars=4)
    out = run(gen, midi_settings=settings, params=greedy(128))
    found = notes(out)
    assert found
    duplicates = [k for k, n in Counter(found).items() if n > 1]
    assert duplicates == []


@pytest.mark.parametrize(
    "written, insisted",
    [
        (["Position_0", "Pitch_67", "Duration_1.0.4"], "Pitch_67"),  # the same note again
        (["Position_12", "Pitch_67", "Duration_1.0.4"], "Position_4"),  # back in time
        (["Position_12", "Pitch_67", "Duration_1.0.4"], "Position_12"),  # the onset again
        (["Position_12", "Pitch_67", "Duration_1.0.4"], "Position_20"),  # past a 4/4 bar
    ],
)
def test_the_grammar_keeps_a_bar_in_time_order_without_duplicates(gen, written, insisted):
    import torch

    from unmask.models.canvas import Canvas, Fixed, Masked
    from unmask.models.sampler import SamplerState

    base, tokens = gen.vocab.ranges.midi_start, gen.vocab.midi.tokens
    names = ["Track_Start", "Program_73", "Bar_None", "TimeSig_4/4", *written]
    ids = gen.header("midi") + [base + tokens.index(n) for n in names]
    state = SamplerState(Canvas([Fixed(ids), Masked(1, "midi_notes")]), greedy(1, steps=1),
                         gen.sampler_vocab)  # fmt: skip
    logits = torch.zeros(state.length, gen.model.config.vocab_size)
    wrong = base + tokens.index(insisted)
    logits[-1, wrong] = 50.0  # the model insists
    state.prepare_inputs()
    state.advance(logits)
    assert int(state.result().ids[-1]) != wrong


# ---- 4. bars and voices limited by the model's window -------------------------------------------


def test_settings_over_the_window_name_the_field_and_the_limit(gen):
    most_voices, most_bars = gen.midi_settings_limits(4)
    if gen.max_len == 384:  # the shipped model: voices * (5 + 5 * bars) + 2 <= 384
        assert (most_voices, most_bars) == (38, 18)
        assert [gen.midi_settings_limits(v)[1] for v in (1, 2, 16)] == [75, 37, 3]
    with pytest.raises(InvalidArgument) as err:
        gen.prepare(GenerationRequest(
            modality="midi", midi_settings=MidiSettings(voices=4, bars=most_bars + 1),
            params=greedy(128),
        ))  # fmt: skip
    assert err.value.field == "midi_settings.bars"
    assert f"at most {most_bars} bars" in str(err.value)
    _, bars16 = gen.midi_settings_limits(16)
    with pytest.raises(InvalidArgument) as err:
        gen.prepare(GenerationRequest(
            modality="midi", midi_settings=MidiSettings(voices=16, bars=64), params=greedy(128)
        ))  # fmt: skip
    assert err.value.field == "midi_settings.bars" and f"at most {bars16} bars" in str(err.value)


def test_settings_at_the_window_limit_work(gen):
    _, most_bars = gen.midi_settings_limits(4)
    out = run(gen, midi_settings=MidiSettings(voices=4, bars=most_bars), params=greedy(64))
    assert {t for t, _, _ in notes(out)}  # a file with notes comes back


def test_voices_over_the_window_name_the_field(gen):
    most_voices, _ = gen.midi_settings_limits(1)
    with pytest.raises(InvalidArgument) as err:
        gen._settings_gap(most_voices + 1, 1, 64)
    assert err.value.field == "midi_settings.voices"
    assert f"at most {most_voices} voices" in str(err.value)


def test_gen_length_too_long_for_the_settings_names_gen_length(gen):
    with pytest.raises(InvalidArgument) as err:
        gen.prepare(GenerationRequest(
            modality="midi", midi_settings=MidiSettings(voices=4, bars=8), params=greedy(1000),
        ))  # fmt: skip
    assert err.value.field == "gen_length"


# ---- 5. over-long prompts are refused, not cut ---------------------------------------------------


def test_an_over_long_text_prompt_is_refused_with_the_limit(gen):
    prompt = "word " * 60
    n = len(gen.vocab.encode_text(prompt))
    room = gen.max_len - 350 - 2
    assert n > room
    with pytest.raises(InvalidArgument) as err:
        gen.prepare(GenerationRequest(modality="text", prompt=prompt, params=greedy(350)))
    assert err.value.field == "prompt"
    message = str(err.value)
    assert f"is {n} tokens" in message and f"at most {room} fit with gen_length 350" in message
    assert f"{gen.max_len}-token window" in message


def test_a_prompt_that_fits_is_kept_whole(gen):
    prompt = "word " * 20
    n = len(gen.vocab.encode_text(prompt))
    job = gen.prepare(
        GenerationRequest(modality="text", prompt=prompt, params=greedy(gen.max_len - 2 - n))
    )
    assert job.prompt_tokens == n + 2


def test_evaluation_still_keeps_the_most_recent_prompt_tokens(gen):
    from unmask.models.evaluate import _EvalGenerator

    ev = _EvalGenerator(gen.model, gen.vocab, gen.meta)
    ids = gen.vocab.encode_text("word " * 60)
    job = ev.prepare_from_ids("text", ids, greedy(350))
    assert job.prompt_tokens == gen.max_len - 350
