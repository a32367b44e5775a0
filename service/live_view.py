"""A terminal view of a canvas being denoised (`--stream`): masked positions as ░, committed
tokens as their text, redrawn after every step.

Token text comes from the shipped vocabulary's BPE file through Hugging Face `tokenizers`
(torch-free); MIDI tokens show as ♪. With a model whose vocabulary differs, pieces may be off —
the final output is always the server's.
"""

from __future__ import annotations

import json
import shutil
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

MASKED, MIDI_TOKEN = "░", "♪"


@lru_cache(maxsize=1)
def _bpe() -> tuple[Any, int] | None:
    try:
        import unmask
        from tokenizers import Tokenizer  # Hugging Face's; torch-free

        vocab_dir = Path(unmask.__file__).parent / "assets" / "vocab"
        num_special = json.loads((vocab_dir / "vocab.json").read_text())["num_special"]
        return Tokenizer.from_file(str(vocab_dir / "bpe.json")), int(num_special)
    except Exception:  # no vocabulary shipped: show ids
        return None


def piece(token_id: int, modality: str) -> str:
    bpe = _bpe()
    if bpe is None:
        return f"#{token_id} "
    tok, base = bpe
    if token_id < base:
        return ""  # PAD / EOS and other specials
    if modality == "midi":
        return MIDI_TOKEN
    local = token_id - base
    if local >= tok.get_vocab_size():
        return MIDI_TOKEN
    return tok.decode([local])


@lru_cache(maxsize=1)
def all_pieces() -> list[str]:
    """Every id's text as the live views draw it (specials "", MIDI ♪), for the playground;
    [] when no vocabulary is shipped."""
    bpe = _bpe()
    if bpe is None:
        return []
    tok, base = bpe
    size = base + tok.get_vocab_size()
    try:
        import unmask

        vocab = Path(unmask.__file__).parent / "assets" / "vocab" / "vocab.json"
        size = int(json.loads(vocab.read_text())["size"])
    except Exception:
        pass
    return [piece(i, "text") for i in range(size)]


class CanvasView:
    """Feed it the stream's events; it redraws the canvas in place on a terminal (or prints
    one line per step otherwise)."""

    def __init__(self, modality: str, out: TextIO | None = None) -> None:
        self.modality = modality
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.tokens: dict[int, str] = {}  # position -> committed text
        self.open: set[int] = set()  # positions still masked (as far as we have seen)
        self._lines = 0
        self.steps = 0

    def render(self) -> str:
        positions = sorted(self.tokens.keys() | self.open)
        text = "".join(MASKED if p in self.open else self.tokens[p] for p in positions)
        return text.replace("\n", "⏎")

    def update(self, event: dict[str, Any]) -> None:
        if event.get("type") != "step":
            return
        self.steps += 1
        for pos, _tid, _conf in event.get("tentative", []):
            if pos not in self.tokens:
                self.open.add(pos)
        for pos, tid, _conf in event.get("committed", []):
            self.open.discard(pos)
            self.tokens[pos] = piece(tid, self.modality)
        for pos in event.get("remasked", []):
            self.tokens.pop(pos, None)
            self.open.add(pos)
        self._draw(f"step {event.get('step', self.steps)} block {event.get('block', 0)}: ")

    def _draw(self, head: str) -> None:
        line = head + self.render()
        if not self.tty:
            print(line, file=self.out)
            return
        width = max(20, shutil.get_terminal_size().columns)
        if self._lines:
            self.out.write(f"\x1b[{self._lines}F\x1b[J")  # up to the first line, clear below
        self.out.write(line + "\n")
        self.out.flush()
        self._lines = max(1, -(-len(line) // width))

    def close(self) -> None:
        if self.tty:
            self.out.flush()
