"""The unified vocabulary: specials + byte-level BPE (text and code) + MIDI, in one id space.

    [0, 16)                 specials (PAD, MASK, BOS, EOS, SEP, <text>, <code>, <midi>, reserved)
    [16, 16 + n_bpe)        BPE ids, shared by text and code
    [16 + n_bpe, size)      MIDI ids (miditok MMM/REMI, without miditok's PAD)

Saved as a directory (`vocab.json`, `bpe.json`, `midi.json`) next to a model; the content hash
covers all three, so a model can refuse a vocabulary it was not trained with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unmask.errors import MidiError, TokenizerError
from unmask.tokenizers.midi import STRUCTURAL_TYPES, MidiCodec, MidiConfig
from unmask.tokenizers.specials import (
    BOS_ID,
    EOS_ID,
    MASK_ID,
    MODALITIES,
    NUM_SPECIAL,
    PAD_ID,
    SEP_ID,
    TAG_IDS,
    special_name,
)
from unmask.tokenizers.text_bpe import TextBPE

FORMAT_VERSION = 1


def default_vocab_dir() -> Path:
    """The vocabulary shipped with unmask (inside the installed package)."""
    import unmask

    return Path(unmask.__file__).parent / "assets" / "vocab"


def check_modality(modality: str, field: str = "modality") -> str:
    if modality not in MODALITIES:
        raise TokenizerError(
            f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}",
            field=field,
            value=modality,
        )
    return modality


@dataclass(frozen=True)
class Ranges:
    bpe_start: int
    bpe_end: int
    midi_start: int
    midi_end: int


class UnifiedVocab:
    pad_id, mask_id, bos_id, eos_id, sep_id = PAD_ID, MASK_ID, BOS_ID, EOS_ID, SEP_ID

    def __init__(self, bpe: TextBPE, midi: MidiCodec) -> None:
        self.bpe = bpe
        self.midi = midi
        start = NUM_SPECIAL
        self.ranges = Ranges(
            start, start + bpe.size, start + bpe.size, start + bpe.size + midi.size
        )
        self.size = self.ranges.midi_end
        self.content_hash = self._hash()

    # ---- ids of each part ------------------------------------------------------------------
    def tag_id(self, modality: str) -> int:
        return TAG_IDS[check_modality(modality)]

    def part_masks(self) -> dict[str, np.ndarray]:
        """Disjoint boolean masks over the vocabulary that together cover it."""
        r = self.ranges
        masks = {name: np.zeros(self.size, dtype=bool) for name in ("special", "bpe", "midi")}
        masks["special"][:NUM_SPECIAL] = True
        masks["bpe"][r.bpe_start : r.bpe_end] = True
        masks["midi"][r.midi_start : r.midi_end] = True
        return masks

    def modality_mask(self, modality: str) -> np.ndarray:
        """Ids a sampler may write inside a span of `modality` (content ids plus EOS)."""
        check_modality(modality)
        parts = self.part_masks()
        mask = parts["midi"].copy() if modality == "midi" else parts["bpe"].copy()
        mask[EOS_ID] = True
        return mask

    def modality_of(self, token_id: int) -> str | None:
        """'text/code' share BPE ids, so BPE ids report 'bpe'; specials report None."""
        r = self.ranges
        if r.bpe_start <= token_id < r.bpe_end:
            return "bpe"
        if r.midi_start <= token_id < r.midi_end:
            return "midi"
        return None

    # ---- MIDI grammar ----------------------------------------------------------------------
    @property
    def midi_types(self) -> list[str]:
        return self.midi.types

    def midi_type_of_id(self) -> np.ndarray:
        """(size,) int array: the MIDI token type index of each id, -1 for non-MIDI ids."""
        out = np.full(self.size, -1, dtype=np.int64)
        out[self.ranges.midi_start : self.ranges.midi_end] = self.midi.type_of_local
        return out

    def midi_allowed_next(self) -> np.ndarray:
        """(n_types, n_types) bool: type b may follow type a (miditok's type graph)."""
        return self.midi.allowed_next.copy()

    def midi_next_mask(self, prev_id: int) -> np.ndarray:
        """Ids allowed right after `prev_id` in a MIDI span (all MIDI ids after a non-MIDI id)."""
        type_of = self.midi_type_of_id()
        is_midi = type_of >= 0
        if type_of[prev_id] < 0:
            return is_midi
        allowed_types = self.midi.allowed_next[type_of[prev_id]]
        return is_midi & allowed_types[np.where(is_midi, type_of, 0)]

    def midi_structural_mask(self) -> np.ndarray:
        """Ids of track, program, bar and time-signature tokens (kept visible in bar infill)."""
        type_of = self.midi_type_of_id()
        structural = [i for i, t in enumerate(self.midi.types) if t in STRUCTURAL_TYPES]
        return np.isin(type_of, structural)

    def count_midi_type_errors(self, ids: Sequence[int]) -> int:
        """Adjacent pairs whose type transition the grammar forbids, plus non-MIDI ids inside."""
        type_of = self.midi_type_of_id()
        errors, prev = 0, -1
        for i in ids:
            t = type_of[int(i)] if 0 <= int(i) < self.size else -1
            if t < 0:
                errors += 1
                continue
            if prev >= 0 and not self.midi.allowed_next[prev, t]:
                errors += 1
            prev = t
        return errors

    # ---- encode / decode -------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Content ids of a string (text or code share the BPE); no BOS/EOS/tag."""
        if not isinstance(text, str):
            raise TokenizerError("text must be a string", field="text", value=type(text).__name__)
        return [self.ranges.bpe_start + i for i in self.bpe.encode(text)]

    def encode_midi(self, data: bytes) -> list[int]:
        return [self.ranges.midi_start + i for i in self.midi.encode(data)]

    def encode(self, content: str | bytes, modality: str) -> list[int]:
        check_modality(modality)
        if modality == "midi":
            if not isinstance(content, bytes | bytearray):
                raise MidiError("MIDI input must be file bytes", field="midi")
            return self.encode_midi(bytes(content))
        return self.encode_text(content)  # type: ignore[arg-type]

    def strip_specials(self, ids: Sequence[int]) -> list[int]:
        """Drop BOS/tag/PAD/SEP, stop at the first EOS; keep content ids only."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i >= NUM_SPECIAL:
                out.append(int(i))
        return out

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        bad = [i for i in ids if not isinstance(i, int | np.integer) or not 0 <= i < self.size]
        if bad:
            raise TokenizerError(
                f"id {bad[0]!r} is out of range [0, {self.size})", field="ids", value=bad[0]
            )
        if MASK_ID in ids:
            raise TokenizerError("ids contain <mask>; nothing to decode there", field="ids")
        return [int(i) for i in ids]

    def infer_modality(self, ids: Sequence[int]) -> str:
        """The modality of an id sequence: its tag if it has one, else its content range."""
        ids = self._check_ids(ids)
        tags = {m for m, t in TAG_IDS.items() if t in ids}
        content = {self.modality_of(i) for i in self.strip_specials(ids)} - {None}
        if len(tags) > 1:
            raise TokenizerError(
                f"ids carry several modality tags ({', '.join(sorted(tags))})", field="ids"
            )
        if len(content) > 1:
            raise TokenizerError("ids mix MIDI and text/code tokens", field="ids")
        if tags:
            tag = tags.pop()
            expected = "midi" if tag == "midi" else "bpe"
            if content and content != {expected}:
                raise TokenizerError(
                    f"ids are tagged <{tag}> but hold {content.pop()} tokens", field="ids"
                )
            return tag
        if not content:
            raise TokenizerError("ids hold no content tokens", field="ids")
        return "midi" if content == {"midi"} else "text"

    def decode(self, ids: Sequence[int], modality: str | None = None) -> str | bytes:
        """Ids → text (str) or a MIDI file (bytes). Specials are dropped; EOS ends content."""
        modality = check_modality(modality) if modality else self.infer_modality(ids)
        content = self.strip_specials(self._check_ids(ids))
        r = self.ranges
        if modality == "midi":
            if any(not r.midi_start <= i < r.midi_end for i in content):
                raise TokenizerError("a MIDI sequence holds non-MIDI ids", field="ids")
            return self.midi.decode([i - r.midi_start for i in content])
        if any(not r.bpe_start <= i < r.bpe_end for i in content):
            raise TokenizerError(f"a {modality} sequence holds MIDI ids", field="ids")
        return self.bpe.decode([i - r.bpe_start for i in content])

    def token_str(self, token_id: int) -> str:
        """Readable name of one id (for live views and debugging)."""
        r = self.ranges
        if token_id < NUM_SPECIAL:
            return special_name(token_id)
        if token_id < r.bpe_end:
            return self.bpe.token(token_id - r.bpe_start)
        return self.midi.tokens[token_id - r.midi_start]

    # ---- files -----------------------------------------------------------------------------
    def _layout(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "num_special": NUM_SPECIAL,
            "specials": [special_name(i) for i in range(NUM_SPECIAL)],
            "bpe_size": self.bpe.size,
            "midi_size": self.midi.size,
            "midi_config": self.midi.config.to_dict(),
            "size": self.size,
        }

    def _hash(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self._layout(), sort_keys=True).encode())
        h.update(self.bpe.to_json().encode())
        h.update("\n".join(self.midi.tokens).encode())
        return h.hexdigest()[:16]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.bpe.save(directory / "bpe.json")
        self.midi.save(directory / "midi.json")  # miditok's own file, for reference and tools
        layout = {**self._layout(), "content_hash": self.content_hash}
        (directory / "vocab.json").write_text(json.dumps(layout, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path | None = None) -> UnifiedVocab:
        directory = Path(directory) if directory else default_vocab_dir()
        layout_path = directory / "vocab.json"
        if not layout_path.exists():
            raise TokenizerError(
                f"no vocabulary at {directory}", field="vocab", value=str(directory)
            )
        layout = json.loads(layout_path.read_text())
        if layout.get("format_version") != FORMAT_VERSION:
            raise TokenizerError("unsupported vocabulary format", field="vocab")
        vocab = cls(
            TextBPE.load(directory / "bpe.json"),
            MidiCodec(MidiConfig.from_dict(layout["midi_config"])),
        )
        if vocab.content_hash != layout["content_hash"]:
            raise TokenizerError(
                f"vocabulary files at {directory} do not match their recorded hash "
                f"({vocab.content_hash} != {layout['content_hash']})",
                field="vocab",
            )
        return vocab

    def summary(self) -> dict:
        return {
            "size": self.size,
            "special": NUM_SPECIAL,
            "bpe": self.bpe.size,
            "midi": self.midi.size,
            "content_hash": self.content_hash,
        }
