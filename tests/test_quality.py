"""The quality-gate metrics: each one must be able to fail."""

from __future__ import annotations

import numpy as np
import pytest

from unmask.models import quality as q

WORDS = frozenset("it was a fine morning and she walked to the town".split())


def test_dictionary_share_counts_real_words_and_is_low_for_gibberish():
    assert q.dictionary_word_share("It was a fine morning", WORDS) == 1.0
    assert q.dictionary_word_share("xqz blorf it", WORDS) == pytest.approx(1 / 3)
    assert q.dictionary_word_share(",,,\n\n", WORDS) is None


def test_repeated_trigrams_catch_loops():
    assert q.repeated_ngram_share("and she was to her and she was to her and she was") > 0.5
    assert q.repeated_ngram_share("it was a fine morning and she walked to town") == 0.0


@pytest.mark.parametrize(
    "text", ["\n\n\n\n\n\n", ",,,\n,,\n\n", "*******************", "   ", "a b"]
)
def test_blank_or_punctuation_samples_are_degenerate(text):
    assert q.is_degenerate(text)


def test_prose_is_not_degenerate():
    assert not q.is_degenerate("It was a fine morning, and she walked to the town.")


@pytest.mark.parametrize(
    ("completion", "ok"),
    [
        ("    return x + 1\n", True),
        ("    y = x * 2\n    return y\n\ndef g():\n    pass\n", True),
        ('    """Only a docstring."""\n', False),
        ("    pass\n", False),
        ("    ...\n", False),
        ("\n\n\n\n", False),
        ("____________", False),
        ("    return (x +\n\nprint(1)\n", False),  # the function body does not parse
        ("    total = 0\n    for i in x:\n        total += i\n    retu", True),  # cut last line
    ],
)
def test_function_with_body(completion, ok):
    assert q.function_with_body("def f(x):\n", completion) is ok


def test_function_headers_are_one_line_defs():
    src = "import os\n\ndef a(x):\n    return x\n\nclass C:\n    def m(self, y) -> int:\n        pass\n"
    assert q.function_headers(src) == ["def a(x):\n", "def m(self, y) -> int:\n"]


def test_pitch_class_entropy_and_transposed_overlap():
    one = q.pitch_class_counts([60] * 10)
    assert q.entropy_bits(one) == 0.0
    scale = q.pitch_class_counts([60, 62, 64, 65, 67, 69, 71])
    assert q.entropy_bits(scale) == pytest.approx(np.log2(7))
    shifted = np.roll(scale, 3)
    assert q.best_transposed_overlap(shifted, scale) == pytest.approx(1.0)
    assert q.best_transposed_overlap(one, scale) < 0.2
