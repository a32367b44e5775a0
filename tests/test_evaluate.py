"""Evaluation metrics and `evaluate_model` end to end on a tiny random model and corpus."""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import mido
import numpy as np
import pytest
import torch

from unmask.corpus.shards import write_docs
from unmask.errors import InvalidArgument
from unmask.models import music_metrics as mm
from unmask.models.evaluate import (
    EvalConfig,
    add_eval_args,
    config_from_args,
    end_of_span_nll,
    evaluate_model,
    format_report,
    parses,
    parsing_prefix,
    unigram_entropy,
)
from unmask.models.generation import Generator
from unmask.models.train import TrainConfig, train

SENTENCES = [
    "The cat sat on the mat and looked at the door.",
    "A small model learns to write short sentences.",
    "Rain fell all day over the quiet little town.",
    "She opened the book and read the first page aloud.",
    "Every morning the baker lit the old stone oven.",
    "The river ran slowly past the mill and the bridge.",
]
SNIPPETS = [
    "import os\n\n\ndef size(path):\n    return os.path.getsize(path)\n",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n",
    "class Box:\n    def __init__(self, x):\n        self.x = x\n",
    "for i in range(10):\n    if i % 2:\n        print(i)\n",
    "x = [n * n for n in range(5)]\ny = sum(x)\n",
    "try:\n    import json\nexcept ImportError:\n    json = None\n",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run best on one thread


def make_midi(pitches: list[int], durations: list[int], tpq: int = 480) -> bytes:
    """One melody track (flute) plus a bass track, durations in 16ths."""
    mid = mido.MidiFile(ticks_per_beat=tpq)
    for program, shift in ((73, 0), (32, -24)):
        track = mido.MidiTrack()
        track.append(mido.Message("program_change", program=program, time=0))
        for p, d in zip(pitches, durations, strict=True):
            ticks = d * tpq // 4
            track.append(mido.Message("note_on", note=p + shift, velocity=80, time=0))
            track.append(mido.Message("note_off", note=p + shift, velocity=0, time=ticks))
        mid.tracks.append(track)
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


SCALE = [60, 62, 64, 65, 67, 69, 71, 72]
RHYTHM = [4, 4, 2, 2, 8, 4, 4, 16]


# ---- metric maths ------------------------------------------------------------------------------


def test_overlap_area():
    h = np.array([1.0, 2.0, 3.0])
    assert mm.overlap_area(h, h) == pytest.approx(1.0)
    assert mm.overlap_area(h, 10 * h) == pytest.approx(1.0)  # normalised first
    assert mm.overlap_area([1, 0, 0], [0, 1, 1]) == 0.0
    assert mm.overlap_area([1, 1, 0, 0], [0, 1, 1, 0]) == pytest.approx(0.5)
    assert mm.overlap_area([0, 0], [1, 0]) == 0.0
    with pytest.raises(ValueError):
        mm.overlap_area([1, 2], [1, 2, 3])


def test_unigram_entropy():
    assert unigram_entropy([7] * 20) == 0.0
    assert unigram_entropy([]) == 0.0
    for k in (2, 5, 16):
        assert unigram_entropy(list(range(k)) * 3) == pytest.approx(math.log2(k))


def test_has_notes_never_raises():
    for junk in (b"", b"garbage", b"MThd\x00\x00\x00\x06junk", None, "text", 3):
        assert mm.has_notes(junk) is False
    assert mm.has_notes(make_midi(SCALE, RHYTHM)) is True


def test_histograms_of_a_known_melody():
    data = make_midi(SCALE, RHYTHM)
    notes = mm.read_notes(data)
    assert len(notes) == 16
    pc = mm.pitch_class_histogram(data)
    assert pc.shape == (12,) and pc.sum() == pytest.approx(1.0)
    assert pc[0] == pytest.approx(4 / 16)  # C4, C5 and their basses
    assert pc[1] == 0.0
    weighted = mm.pitch_class_histogram(notes, weighted=True)
    assert weighted[0] == pytest.approx((1 + 4) / (sum(RHYTHM) / 4))  # C4 1 beat + C5 4 beats
    dur = mm.duration_histogram(notes)
    # 16ths of [4, 4, 2, 2, 8, 4, 4, 16] = beats 1, 1, .5, .5, 2, 1, 1, 4
    labels = dict(zip(mm.DURATION_LABELS, dur, strict=True))
    assert labels["1"] == pytest.approx(4 / 8)
    assert labels["1/2"] == pytest.approx(2 / 8)
    assert labels["2"] == pytest.approx(1 / 8) and labels["4+"] == pytest.approx(1 / 8)
    assert mm.duration_bin(1 / 32) == 0 and mm.duration_bin(1.5) == 4 and mm.duration_bin(9) == 6
    assert mm.overlap_area(pc, mm.pitch_class_histogram(make_midi(SCALE, RHYTHM))) == 1.0


def test_code_parse_helpers():
    assert parses("x = 1\n") and not parses("def f(:\n")
    src = "x = 1\ny = [1,\n  2]\nz = (\n"
    assert parsing_prefix(src) == len("x = 1\ny = [1,\n  2]\n")
    # the cut-off last line does not count unless the snippet ended on purpose
    assert parsing_prefix("a = 1\nb = 2") == len("a = 1\n")
    assert parsing_prefix("a = 1\nb = 2", last_line_complete=True) == len("a = 1\nb = 2")
    assert parsing_prefix("(((\n") == 0


def test_config_validation():
    with pytest.raises(InvalidArgument):
        EvalConfig(split="train")
    with pytest.raises(InvalidArgument):
        EvalConfig(modalities=("video",))
    with pytest.raises(InvalidArgument):
        EvalConfig(gen_length=8, steps=9)  # SamplerParams checks the decoding knobs
    parser = argparse.ArgumentParser()
    add_eval_args(parser)
    args = parser.parse_args(["--samples", "3", "--modalities", "text,midi", "--json"])
    cfg = config_from_args(args)
    assert cfg.n_samples == 3 and cfg.modalities == ("text", "midi") and args.json


# ---- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, vocab):
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "corpus"
    text = [vocab.encode_text(s) for s in SENTENCES]
    code = [vocab.encode_text(s) for s in SNIPPETS]
    midi = [
        vocab.encode_midi(make_midi([p + shift for p in SCALE], RHYTHM[k:] + RHYTHM[:k]))
        for k, shift in enumerate((0, 2, -3, 5))
    ]
    for split in ("train", "val", "test"):
        write_docs(corpus / split / "text", text)
        write_docs(corpus / split / "code", code)
        write_docs(corpus / split / "midi", midi)
    base = dict(
        corpus=str(corpus), d_model=32, n_layers=1, n_heads=2, seq_len=64, batch_size=4,
        max_steps=2, warmup_steps=1, eval_every=0, eval_batches=1, eval_samples=1,
        ckpt_every=0, num_threads=1, device="cpu",
    )  # fmt: skip
    diff = train(TrainConfig(**base, out=str(root / "diff")), vocab=vocab, progress=False)
    ar = train(
        TrainConfig(**base, objective="ar", out=str(root / "ar")), vocab=vocab, progress=False
    )
    return corpus, diff, ar


def _check_samples(s: dict, modality: str, n: int) -> None:
    assert s["n"] == n
    assert s["unigram_entropy_bits"] >= 0.0
    assert s["nfe"] >= 1 and s["tokens_per_forward"] > 0 and s["latency_s"] > 0
    if modality == "code":
        for key in ("parse_rate", "parse_rate_trimmed", "parsed_char_share"):
            assert 0.0 <= s[key] <= 1.0
        assert s["parse_rate_trimmed"] >= 0.0
    if modality == "midi":
        for key in ("valid_rate", "new_notes_rate", "type_error_rate"):
            assert 0.0 <= s[key] <= 1.0
        for key in ("pitch_class_overlap", "duration_overlap"):
            assert s[key] is None or 0.0 <= s[key] <= 1.0 + 1e-9
        assert s["reference_docs"] == 4 and s["reference_notes"] > 0


def test_evaluate_model_end_to_end(tiny):
    corpus, diff, ar = tiny
    cfg = EvalConfig(
        model=str(diff), ar_model=str(ar), corpus=str(corpus), split="test", batches=1,
        batch_size=2, t_samples=2, n_samples=2, prompt_tokens=6, gen_length=12, steps=6,
        block_length=6, midi_reference="split", function_headers=2, function_gen_length=8,
    )  # fmt: skip
    res = evaluate_model(cfg)
    json.dumps(res)  # serialisable
    gates = res["gates"]
    assert {"nelbo_over_ar_text", "code_function_body_rate", "midi_pitch_class_entropy"} <= set(
        gates
    )
    for g in gates.values():
        assert g["met"] in (True, False, None)
    assert res["model"]["objective"] == "diffusion" and res["ar_model"]["objective"] == "ar"
    assert res["model"]["parameters"] > 0 and res["model"]["tokens_seen"] == 2 * 4 * 64
    assert res["config"]["n_samples"] == 2 and res["wall_time_s"] > 0
    assert set(res["modalities"]) == {"text", "code", "midi"}
    for m, row in res["modalities"].items():
        assert row["eval_docs"] == 2 and row["eval_tokens"] > 0
        assert row["nelbo_per_token"] > 0 and row["ppl_bound"] > 1
        assert row["ppl_bound"] == pytest.approx(math.exp(row["nelbo_per_token"]))
        assert row["ar_nll_per_token"] > 0 and row["ar_ppl"] > 1
        _check_samples(row["samples"], m, 2)
        _check_samples(row["ar_samples"], m, 2)
        assert row["ar_samples"]["tokens_per_forward"] == pytest.approx(1.0, abs=0.1)
    # MIDI samples start from scratch (the gates' setting); continuations are reported beside
    midi = res["modalities"]["midi"]
    assert midi["samples"]["prompt_tokens_mean"] == 0
    assert midi["continuations"]["prompt_tokens_mean"] == 6
    _check_samples(midi["continuations"], "midi", 2)
    _check_samples(midi["ar_continuations"], "midi", 2)
    assert 0.0 <= midi["continuations"]["prompt_kept_rate"] <= 1.0
    assert gates["midi_continuation_keeps_prompt"]["value"] is not None
    report = format_report(res)
    assert "NELBO" in report and "midi" in report and "parse" in report


def test_evaluate_ar_model_alone(tiny):
    corpus, _, ar = tiny
    cfg = EvalConfig(
        model=str(ar), corpus=str(corpus), modalities=("code",), batches=1, batch_size=2,
        n_samples=0,
    )  # fmt: skip
    res = evaluate_model(cfg)
    row = res["modalities"]["code"]
    assert set(res["modalities"]) == {"code"} and "samples" not in row
    assert row["nll_per_token"] > 0 and row["ppl"] > 1 and "nelbo_per_token" not in row
    with pytest.raises(InvalidArgument):
        evaluate_model(EvalConfig(model=str(ar), corpus=str(corpus), gen_length=62, steps=31))


def test_a_block_diffusion_model_reports_its_left_to_right_nll_and_gates_infill_on_it(tiny, vocab):
    corpus, _, ar = tiny
    bd = train(
        TrainConfig(
            corpus=str(corpus), d_model=32, n_layers=1, n_heads=2, seq_len=64, batch_size=4,
            max_steps=2, warmup_steps=1, eval_every=0, eval_batches=1, eval_samples=1,
            ckpt_every=0, num_threads=1, device="cpu", objective="block_diffusion",
            block_size=4, token_shift=True, out=str(Path(corpus).parent / "bd"),
        ),
        vocab=vocab,
        progress=False,
    )  # fmt: skip
    cfg = EvalConfig(
        model=str(bd), ar_model=str(ar), corpus=str(corpus), modalities=("text",), batches=1,
        batch_size=2, t_samples=2, n_samples=0, infill_rows=2, infill_gap=2, function_headers=0,
    )  # fmt: skip
    res = evaluate_model(cfg)
    row = res["modalities"]["text"]
    assert row["left_to_right_nll_per_token"] > 0 and row["nelbo_per_token"] > 0
    inf = row["infill"]
    gate = res["gates"]["infill_gap_nll_vs_ar_left_only_text"]
    assert gate["value"] == inf["gap_nll_left_to_right"] and gate["nelbo"] == inf["gap_nll"]
    assert gate["threshold"] == inf["ar_left_only_gap_nll"] and gate["met"] in (True, False)
    assert "L2R NLL" in format_report(res)
    # variable-length infill: the NLL of the EOS that ends a gap longer than its text
    gen = Generator.load(bd, dtype="float32")
    head = [int(gen.vocab.bos_id), int(gen.vocab.tag_id("text"))]
    ids = torch.tensor([head + gen.vocab.encode("the cat sat on the mat and then it", "text")])
    gaps = torch.zeros_like(ids, dtype=torch.bool)
    gaps[0, 4:7] = True
    short, long = (end_of_span_nll(gen, ids, gaps, extra) for extra in (1, 3))
    assert 0 < short < 50 and 0 < long < 50 and short != long  # the right side moves on
