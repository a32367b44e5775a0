"""The unified vocabulary: ids, exact text/code round trips, masks, save/load and hashes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unmask.errors import TokenizerError, UnmaskError
from unmask.tokenizers.specials import MODALITIES
from unmask.tokenizers.vocab import UnifiedVocab


def test_pad_eos_and_mask_are_distinct_specials(vocab):
    ids = {vocab.pad_id, vocab.eos_id, vocab.mask_id, vocab.bos_id, vocab.sep_id}
    ids |= {vocab.tag_id(m) for m in MODALITIES}
    assert len(ids) == 5 + len(MODALITIES)
    assert max(ids) < vocab.ranges.bpe_start


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\t\tindent\t",
        "a\r\nb\r\n",
        "trailing   ",
        "emoji 😀🎉👩‍👩‍👧",
        "naïve café",
        "\x00\x01\x7f",
        "    def f(x):\n        return x  \n",
        "中文字符",
        "\u200b\ufeff",
    ],
)
def test_text_round_trip_is_exact_for_awkward_strings(vocab, text):
    assert vocab.decode(vocab.encode(text, "text"), "text") == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_unicode_string_round_trips(vocab, text):
    assert vocab.decode(vocab.encode_text(text), "code") == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["    ", "\t", "def ", "return", "\n", "if x:", " = ", "# c"])))
def test_code_like_strings_round_trip(vocab, parts):
    code = "".join(parts)
    assert vocab.decode(vocab.encode(code, "code"), "code") == code


def test_indentation_gets_whole_tokens(vocab):
    # Runs of spaces must be merged: 8 spaces of indentation should be at most 2 tokens.
    ids = vocab.encode_text("        return")
    assert len(ids) <= 3


def test_parts_partition_the_vocabulary(vocab):
    parts = vocab.part_masks()
    stacked = np.stack(list(parts.values()))
    assert (stacked.sum(axis=0) == 1).all()
    assert stacked.shape[1] == vocab.size


def test_modality_masks_allow_content_and_eos_only(vocab):
    midi, text, code = (vocab.modality_mask(m) for m in ("midi", "text", "code"))
    assert midi[vocab.eos_id] and text[vocab.eos_id]
    for m in (midi, text, code):
        assert not m[vocab.mask_id] and not m[vocab.pad_id] and not m[vocab.bos_id]
    content_overlap = midi & text
    content_overlap[vocab.eos_id] = False
    assert not content_overlap.any()
    assert (text == code).all()  # text and code share the BPE
    assert midi.sum() == vocab.midi.size + 1


def test_unknown_modality_is_a_typed_error(vocab):
    with pytest.raises(TokenizerError, match="modality"):
        vocab.encode("x", "video")


@pytest.mark.parametrize("bad", [[-1], [10**9], [1.5]])
def test_out_of_range_ids_are_refused(vocab, bad):
    with pytest.raises(TokenizerError, match="out of range"):
        vocab.decode(bad, "text")


def test_mixed_modality_tags_are_refused(vocab):
    ids = [vocab.bos_id, vocab.tag_id("text"), vocab.tag_id("midi"), *vocab.encode_text("hi")]
    with pytest.raises(TokenizerError, match="several modality tags"):
        vocab.decode(ids)


def test_text_tag_with_midi_content_is_refused(vocab, chorale_midi):
    ids = [vocab.bos_id, vocab.tag_id("text"), *vocab.encode_midi(chorale_midi)[:20]]
    with pytest.raises(TokenizerError, match="tagged <text>"):
        vocab.decode(ids)


def test_save_load_gives_identical_ids(vocab, tmp_path, chorale_midi):
    vocab.save(tmp_path / "v")
    again = UnifiedVocab.load(tmp_path / "v")
    assert again.content_hash == vocab.content_hash
    sample = "def main():\n    print('hello, world')\r\n"
    assert again.encode_text(sample) == vocab.encode_text(sample)
    assert again.encode_midi(chorale_midi) == vocab.encode_midi(chorale_midi)


def test_tampered_vocabulary_files_are_refused(vocab, tmp_path):
    d = vocab.save(tmp_path / "v")
    layout = json.loads((d / "vocab.json").read_text())
    layout["content_hash"] = "0" * 16
    (d / "vocab.json").write_text(json.dumps(layout))
    with pytest.raises(TokenizerError, match="do not match"):
        UnifiedVocab.load(d)


def test_missing_vocabulary_directory_is_a_typed_error(tmp_path):
    with pytest.raises(UnmaskError, match="no vocabulary"):
        UnifiedVocab.load(tmp_path / "nothing")


def test_shipped_vocabulary_has_a_stable_layout(vocab, tmp_path):
    shutil.copytree(vocab.save(tmp_path / "a"), tmp_path / "b")
    assert UnifiedVocab.load(tmp_path / "b").summary() == vocab.summary()
    assert vocab.size == 16 + vocab.bpe.size + vocab.midi.size
