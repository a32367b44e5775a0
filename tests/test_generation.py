"""Generation as a user calls it (prompt, infill, MIDI bars) on tiny random models."""

from __future__ import annotations

import pytest

from unmask.errors import InvalidArgument, MidiError
from unmask.models.generation import Generator, fit_params, midi_bar_spans
from unmask.models.sampler_params import SamplerParams
from unmask.models.template import parse_template

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run best on one thread


def params(n: int = 16, **kw) -> SamplerParams:
    return SamplerParams(gen_length=n, steps=max(n // 2, 1), **kw)


def test_text_generation_returns_prompt_plus_text_and_usage(tiny_model_dir):
    gen = Generator.load(tiny_model_dir).generate("text", "Once upon", params(16))
    assert isinstance(gen.output, str) and gen.output.startswith("Once upon")
    usage = gen.usage()
    assert usage["nfe"] >= 1 and usage["prompt_tokens"] > 2
    assert 0 < usage["generated_tokens"] <= 16


def test_same_seed_gives_the_same_text(tiny_model_dir):
    g = Generator.load(tiny_model_dir)
    p = params(16, temperature=1.0, seed=7)
    assert g.generate("code", "def f(", p).output == g.generate("code", "def f(", p).output


def test_infill_keeps_fixed_text_byte_identical(tiny_model_dir):
    template = "def add(a, b):\r\n    [MASK:6]\n\treturn 😀 [MASK:3] end  "
    gen = Generator.load(tiny_model_dir).infill("code", template, params(8))
    out = gen.output
    assert out.startswith("def add(a, b):\r\n    ")
    assert out.endswith(" end  ")
    assert "\n\treturn 😀 " in out


def test_template_without_gap_is_refused():
    with pytest.raises(InvalidArgument, match="no \\[MASK:n\\] gap"):
        parse_template("nothing to fill")
    assert parse_template("a[MASK:2]b") == ("a", 2, "b")


def test_fit_params_rescales_to_the_canvas():
    p = fit_params(SamplerParams(gen_length=64, steps=32, block_length=16), 10)
    assert p.gen_length == 10 and p.steps == 5 and p.block_length is None


def test_too_long_generation_names_the_field(tiny_model_dir):
    with pytest.raises(InvalidArgument) as err:
        Generator.load(tiny_model_dir).generate("text", "x", params(255))
    assert err.value.field == "gen_length"


def test_ar_baseline_generates_through_the_same_call(tiny_ar_dir):
    g = Generator.load(tiny_ar_dir)
    assert g.is_ar
    gen = g.generate("text", "Hello", params(12))
    assert gen.output.startswith("Hello") and gen.nfe >= 1


def test_ar_baseline_cannot_infill(tiny_ar_dir):
    with pytest.raises(InvalidArgument, match="cannot fill"):
        Generator.load(tiny_ar_dir).infill("text", "a [MASK:3] b", params(3))


def test_midi_generation_gives_a_file_or_a_typed_error(tiny_model_dir):
    import io

    import mido

    g = Generator.load(tiny_model_dir)
    files, errors = [], []
    for seed in range(3):
        try:
            files.append(g.generate("midi", None, params(32, temperature=1.0, seed=seed)).output)
        except MidiError as exc:
            errors.append(exc)
    # a seed may fail, but only with a typed error that names the output as at fault
    assert all(e.field == "output" for e in errors), errors
    assert files, f"every seed failed, none gave a MIDI file: {errors}"
    for out in files:
        assert isinstance(out, bytes) and out[:4] == b"MThd"
        mido.MidiFile(file=io.BytesIO(out))  # a whole, parseable file, not just its header


def test_midi_bar_spans_skip_structural_tokens(vocab, chorale_midi):
    ids = vocab.encode_midi(chorale_midi)
    spans = midi_bar_spans(vocab, ids, bars=[1], tracks=[0])
    assert len(spans) == 1
    structural = vocab.midi_structural_mask()
    a, b = spans[0]
    assert not structural[ids[a:b]].any()
    assert structural[ids[a - 1]]  # the bar line (or its time signature) stays visible


def test_midi_bar_infill_keeps_the_tracks_and_other_bars(tiny_model_dir, vocab, chorale_midi):
    g = Generator.load(tiny_model_dir)
    try:
        gen = g.infill_midi(chorale_midi, bars=[2], tracks=[1], params=params(16))
    except MidiError:
        pytest.skip("random model wrote an undecodable bar")
    import symusic

    before, after = symusic.Score.from_midi(chorale_midi), symusic.Score.from_midi(gen.output)
    assert len([t for t in after.tracks if t.notes]) == len([t for t in before.tracks if t.notes])
    # track 0 was not touched
    p0 = before.tracks[1].program if not before.tracks[0].notes else before.tracks[0].program
    t_before = next(t for t in before.tracks if t.program == p0)
    t_after = next(t for t in after.tracks if t.program == p0)
    assert len(t_before.notes) == len(t_after.notes)
