"""Sample-quality metrics behind the model's quality gates (pure functions, no torch).

Each metric can fail: whitespace, punctuation, loops and docstring-only functions score badly.

* text: share of generated words found in a dictionary (Debian's `wamerican` word list), share
  of word 3-grams that repeat an earlier 3-gram of the same sample, and whether a sample is
  degenerate (mostly blank lines or punctuation);
* code: whether `header + completion` is a function that parses with `ast` and whose body does
  something (a docstring, `pass` or `...` alone does not count);
* MIDI: pitch-class entropy per piece and the pitch-class histogram overlap with a reference,
  best over the 12 transpositions (a piece in another key is not a worse piece).
"""

from __future__ import annotations

import ast
import math
import re
import textwrap
import tokenize
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

WORD_LISTS = (Path("/usr/share/dict/american-english"), Path("/usr/share/dict/words"))
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


@lru_cache(maxsize=1)
def dictionary() -> frozenset[str] | None:
    """Lower-cased words of the system word list (apt package `wamerican`); None if absent."""
    for path in WORD_LISTS:
        if path.exists():
            words = path.read_text(encoding="utf-8", errors="ignore").split()
            return frozenset(w.lower() for w in words)
    return None


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def dictionary_word_share(text: str, vocabulary: frozenset[str] | None = None) -> float | None:
    """Share of the words of `text` that are dictionary words (None without words or list)."""
    vocabulary = vocabulary if vocabulary is not None else dictionary()
    ws = words(text)
    if vocabulary is None or not ws:
        return None
    return sum(w in vocabulary or w.rstrip("s") in vocabulary for w in ws) / len(ws)


def repeated_ngram_share(text: str, n: int = 3) -> float | None:
    """Share of word n-grams that already occurred earlier in the same text (loops score high)."""
    ws = words(text)
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    if not grams:
        return None
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def is_degenerate(text: str) -> bool:
    """Mostly blank lines or punctuation: fewer than 40% of the non-space characters are letters
    or digits, or fewer than 3 words, or more than half the lines are blank."""
    visible = [c for c in text if not c.isspace()]
    if len(words(text)) < 3 or not visible:
        return True
    if sum(c.isalnum() for c in visible) / len(visible) < 0.4:
        return True
    lines = text.split("\n")
    return len(lines) > 4 and sum(not ln.strip() for ln in lines) / len(lines) > 0.5


# ---- code --------------------------------------------------------------------------------------

_TRIVIAL = (ast.Pass,)


def _nontrivial(body: Sequence[ast.stmt]) -> bool:
    for stmt in body:
        if isinstance(stmt, _TRIVIAL):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring or a bare `...`
        return True
    return False


def function_with_body(header: str, completion: str) -> bool:
    """True when header + completion holds a complete function whose body does something.

    The function ends at the first non-blank line indented no deeper than its `def`; all of it
    must parse. A function still open when the text ends (the length limit cut it) may lose its
    last, possibly cut-off line, and no more."""
    source = textwrap.dedent(header + completion)
    lines = source.split("\n")
    if not lines or not lines[0].lstrip().startswith(("def ", "async def ")):
        return False
    end = None
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() and not line[:1].isspace():
            end = i
            break
    candidates = [lines[:end]] if end is not None else [lines, lines[:-1]]
    for body_lines in candidates:
        try:
            tree = ast.parse("\n".join(body_lines))
        except (SyntaxError, ValueError):
            continue
        fns = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        return bool(fns) and _nontrivial(fns[0].body)
    return False


_FSTRING = tuple(
    getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
    if hasattr(tokenize, n)
)  # fmt: skip
_NOT_CODE = frozenset(
    (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
     tokenize.STRING, tokenize.ENDMARKER)
)  # fmt: skip


def adds_code(head: str, completion: str) -> bool:
    """Whether `completion` (after `head`) holds code: a token that is not whitespace, a comment,
    a string (a docstring), `pass` or `...`. A blank or docstring-only completion leaves a parsing
    prompt parsing; it must not count as code that parses. Tokens that start in `head` (a string
    the prompt opened) do not count; text the tokenizer cannot read is code (it may parse)."""
    if not completion.strip():
        return False
    source = head + completion
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    try:
        for tok in tokenize.generate_tokens(iter(lines).__next__):
            row, col = tok.start
            if row - 1 >= len(lines) or starts[row - 1] + col < len(head):
                continue
            if tok.type in _NOT_CODE or tok.string in ("pass", "...", "."):
                continue
            if tok.type in _FSTRING:  # Python 3.12+: an f-string's parts are strings too
                continue
            return True
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return True
    return False


_DEF = re.compile(r"^([ \t]*)(async\s+)?def\s+\w+\s*\(.*\)\s*(->\s*[^:]+)?:\s*$")


def function_headers(source: str) -> list[str]:
    """One-line `def` headers of a source file, dedented, each ending with a newline."""
    return [line.strip() + "\n" for line in source.split("\n") if _DEF.match(line)]


# ---- MIDI --------------------------------------------------------------------------------------


def entropy_bits(histogram: Iterable[float]) -> float:
    h = np.asarray(list(histogram), dtype=np.float64)
    total = h.sum()
    if total <= 0:
        return 0.0
    p = h[h > 0] / total
    return float(-(p * np.log2(p)).sum())


def pitch_class_counts(pitches: Iterable[int]) -> np.ndarray:
    counts = Counter(int(p) % 12 for p in pitches)
    return np.array([counts.get(i, 0) for i in range(12)], dtype=np.float64)


def best_transposed_overlap(hist: np.ndarray, reference: np.ndarray) -> float:
    """max over k of sum(min(p_k, q)) of normalised pitch-class histograms, p_k rotated by k."""
    p = np.asarray(hist, dtype=np.float64)
    q = np.asarray(reference, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    return float(max(np.minimum(np.roll(p, k), q).sum() for k in range(12)))


def share(flags: Iterable[bool]) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def mean(values: Iterable[float | None]) -> float | None:
    vs = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vs) / len(vs) if vs else None
