"""What a position may hold: the modality masks, the MIDI grammar and pinned tokens.

`apply_constraints` sets to -inf every logit a position may not take: ids outside its span's
modality, MASK and PAD always, and in a MIDI span the grammar. The grammar has two parts:

  * types (`grammar_mask`): an id's token type must be able to follow the nearest committed
    token on its left and lead to the nearest committed token on its right *in exactly as many
    steps as the canvas leaves* (`ConstraintTables.reach`: which type can reach which in d
    steps through the types the span allows). A bar gap of 16 tokens before a fixed bar line
    must end on a type that may precede the bar line, so a note cannot be cut in half there;
  * onsets (`onset_mask`): inside a bar, positions move forward and stay in the bar, and a pitch
    sounds once per onset.

Both read the canvas in canvas order. A block-causal model runs an infill canvas in infill order
(known tokens first, then each gap; models/block_sampler.py); `canvas_index` maps its slots back
to canvas positions, so the neighbours are the true ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unmask.errors import InvalidArgument

REACH_MAX = 64  # distances beyond this use the table at REACH_MAX (it has long stopped changing)

# MIDI token types after which the next pitch belongs to another onset (or track): a pitch may
# repeat across them, not inside the run of notes between two of them
MIDI_ONSET_TYPES = ("Position", "Bar", "TimeSig", "Tempo", "Track_Start", "Track_End", "Program")
# ... and those that start a bar (its time signature follows the bar line in our encoding)
MIDI_BAR_TYPES = ("Bar", "TimeSig", "Track_Start", "Track_End", "Program")


# ---------------------------------------------------------------------------------------------
# Vocabulary view and constraint tables
# ---------------------------------------------------------------------------------------------


def _as_tensor(x: Any, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=dtype)


@dataclass(frozen=True, eq=False)
class SamplerVocab:
    """The few vocabulary facts the sampler needs, as plain ids and arrays (no tokenizer import).

    modality_masks:    name -> bool (V,) ids allowed in a span of that modality (EOS included).
    midi_type_of_id:   int (V,) MIDI token type of each id, -1 for non-MIDI ids.
    midi_allowed_next: bool (n_types, n_types): type b may follow type a.
    grammar_modality:  spans of this modality (or these modalities) get the MIDI grammar mask.
    midi_onsets:       what the grammar needs to keep a bar's notes in time order and free of
                       duplicates (`MidiOnsets`); None = off.
    """

    mask_id: int
    eos_id: int
    pad_id: int
    modality_masks: Mapping[str, Any] = field(default_factory=dict)
    midi_type_of_id: Any = None
    midi_allowed_next: Any = None
    grammar_modality: str | tuple[str, ...] = ("midi", "midi_bar", "midi_notes")
    midi_onsets: MidiOnsets | None = None
    # (vocab_size, device) -> ConstraintTables: built once, shared by every job (read-only)
    _tables: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("mask_id", "eos_id", "pad_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument("must be a non-negative token id", field=name, value=value)
        masks = {k: _as_tensor(v, torch.bool).flatten() for k, v in self.modality_masks.items()}
        object.__setattr__(self, "modality_masks", masks)
        if (self.midi_type_of_id is None) != (self.midi_allowed_next is None):
            raise InvalidArgument(
                "give both midi_type_of_id and midi_allowed_next, or neither",
                field="midi_allowed_next",
            )
        if self.midi_type_of_id is not None:
            types = _as_tensor(self.midi_type_of_id, torch.long).flatten()
            nxt = _as_tensor(self.midi_allowed_next, torch.bool)
            n = int(types.max()) + 1 if types.numel() else 0
            if nxt.dim() != 2 or nxt.shape[0] != nxt.shape[1] or nxt.shape[0] < n:
                raise InvalidArgument(
                    f"must be a square (n_types, n_types) matrix with n_types >= {n}",
                    field="midi_allowed_next",
                    value=tuple(nxt.shape),
                )
            object.__setattr__(self, "midi_type_of_id", types)
            object.__setattr__(self, "midi_allowed_next", nxt)

    @classmethod
    def from_vocab(
        cls, vocab: Any, modalities: Sequence[str] = ("text", "code", "midi")
    ) -> SamplerVocab:
        """From any object with the unified vocabulary's interface (duck-typed: pad_id, mask_id,
        eos_id, modality_mask(m), midi_type_of_id(), midi_allowed_next())."""
        masks = {m: vocab.modality_mask(m) for m in modalities}
        type_of = np.asarray(vocab.midi_type_of_id())
        names = list(getattr(vocab, "midi_types", []))
        if "midi" in masks and hasattr(vocab, "midi_structural_mask"):
            # "midi_bar": the notes inside a bar whose structure (track, program, bar line, time
            # signature) is given — no structural tokens and no EOS, so a gap cannot close early
            bar = masks["midi"] & ~vocab.midi_structural_mask()
            bar[int(vocab.eos_id)] = False
            masks["midi_bar"] = bar
            # "midi_notes": the same without tempo changes, for bars of a piece whose tempo is
            # fixed (settings, a continuation): the piece keeps the one tempo it was given
            if "Tempo" in names:
                masks["midi_notes"] = bar & (type_of != names.index("Tempo"))
        return cls(
            mask_id=int(vocab.mask_id),
            eos_id=int(vocab.eos_id),
            pad_id=int(vocab.pad_id),
            modality_masks=masks,
            midi_type_of_id=type_of,
            midi_allowed_next=vocab.midi_allowed_next(),
            midi_onsets=MidiOnsets.from_vocab(vocab) if "Pitch" in names else None,
        )

    @property
    def modality_rows(self) -> dict[str | None, int]:
        """Row of each modality in ConstraintTables.allowed; row 0 = unconstrained."""
        rows: dict[str | None, int] = {None: 0}
        rows.update({name: i + 1 for i, name in enumerate(self.modality_masks)})
        return rows

    def tables(self, vocab_size: int, device: torch.device | str = "cpu") -> ConstraintTables:
        """Constraint tensors sized to the model's logits (a padded model vocab is allowed); built
        once per size and device, then shared (nothing writes to them)."""
        key = (vocab_size, str(torch.device(device)))
        if key not in self._tables:
            self._tables[key] = self._build_tables(vocab_size, device)
        return self._tables[key]

    def _build_tables(self, vocab_size: int, device: torch.device | str) -> ConstraintTables:

        def fit(x: Tensor, fill: int | bool) -> Tensor:
            if x.numel() > vocab_size:
                raise InvalidArgument(
                    f"vocabulary array of size {x.numel()} exceeds the model's {vocab_size} logits",
                    field="vocab",
                    value=x.numel(),
                )
            out = torch.full((vocab_size,), fill, dtype=x.dtype)
            out[: x.numel()] = x
            return out

        for name in ("mask_id", "eos_id", "pad_id"):
            if getattr(self, name) >= vocab_size:
                raise InvalidArgument(
                    f"must be < the model's vocab size {vocab_size}",
                    field=name,
                    value=getattr(self, name),
                )
        base = torch.ones(vocab_size, dtype=torch.bool)
        base[self.mask_id] = False  # MASK is the absorbing state, never an output
        base[self.pad_id] = False  # PAD only ever comes from EOS truncation
        rows = [base] + [fit(m, False) & base for m in self.modality_masks.values()]
        type_of = next_ok = None
        if self.midi_type_of_id is not None:
            type_of = fit(self.midi_type_of_id, -1).to(device)
            next_ok = self.midi_allowed_next.to(device)
        names = (
            (self.grammar_modality,)
            if isinstance(self.grammar_modality, str)
            else self.grammar_modality
        )
        grammar_rows = [self.modality_rows[n] for n in names if n in self.modality_rows]
        grammar_row = (
            torch.tensor(grammar_rows, dtype=torch.long, device=device) if grammar_rows else None
        )
        onsets = self.midi_onsets
        if onsets is not None and next_ok is not None:
            n_types = next_ok.shape[0]
            onsets = MidiOnsets(
                onsets.pitch_type,
                _type_flags(onsets.onset_types, n_types, device),
                _type_flags(onsets.bar_types, n_types, device),
                fit(_as_tensor(onsets.position_of, torch.long), -1).to(device),
                fit(_as_tensor(onsets.bar_positions, torch.long), 0).to(device),
            )
        allowed = torch.stack(rows)
        reach = None
        if type_of is not None and next_ok is not None:
            reach = grammar_reach(next_ok.cpu(), type_of.cpu(), allowed).to(device)
        return ConstraintTables(allowed.to(device), type_of, next_ok, grammar_row, onsets, reach)


@dataclass(frozen=True, eq=False)
class ConstraintTables:
    allowed: Tensor  # bool [n_modalities + 1, V]; row 0 = unconstrained
    type_of_id: Tensor | None  # long [V], -1 for non-MIDI ids
    allowed_next: Tensor | None  # bool [n_types, n_types]
    grammar_row: Tensor | None  # long [k]: modality rows whose positions get the grammar mask
    onsets: MidiOnsets | None = None  # as tensors: onset/bar_types are bool [n_types] flags
    reach: Tensor | None = None  # bool [n_rows, REACH_MAX + 1, n_types, n_types] (`grammar_reach`)


@dataclass(frozen=True, eq=False)
class MidiOnsets:
    """The MIDI facts behind the onset rules of the grammar (`onset_mask`): in a bar, positions
    only move forward and stay inside the bar, and a pitch sounds once per onset."""

    pitch_type: int
    onset_types: Any  # types that end one onset's notes (ids of types, or bool [n_types] flags)
    bar_types: Any  # types that end a bar's onsets (bar line, time signature, track)
    position_of: Any  # int (V,): onset in the bar of each Position id, -1 for other ids
    bar_positions: Any  # int (V,): positions in a bar of each TimeSig id, 0 for other ids

    @classmethod
    def from_vocab(cls, vocab: Any) -> MidiOnsets:
        names = list(vocab.midi_types)
        position_of = np.full(vocab.size, -1, dtype=np.int64)
        bar_positions = np.zeros(vocab.size, dtype=np.int64)
        per_beat = int(vocab.midi.config.positions_per_beat)  # a beat is the denominator's note
        base = vocab.ranges.midi_start
        for i, token in enumerate(vocab.midi.tokens):
            kind, _, value = token.partition("_")
            if kind == "Position":
                position_of[base + i] = int(value)
            elif kind == "TimeSig":
                bar_positions[base + i] = int(value.split("/")[0]) * per_beat
        return cls(
            names.index("Pitch"),
            tuple(names.index(t) for t in MIDI_ONSET_TYPES if t in names),
            tuple(names.index(t) for t in MIDI_BAR_TYPES if t in names),
            position_of,
            bar_positions,
        )


def grammar_reach(allowed_next: Tensor, type_of_id: Tensor, allowed: Tensor) -> Tensor:
    """bool [n_rows, REACH_MAX + 1, n, n]: reach[r, d, a, b] = a token of type b can come d steps
    after one of type a, every token in between of a type that modality row r allows (the
    types a gap of that row may hold). d = 0 is the identity; d >= REACH_MAX reads REACH_MAX."""
    n = allowed_next.shape[0]
    nxt = allowed_next.to(torch.float32)
    out = torch.zeros(allowed.shape[0], REACH_MAX + 1, n, n, dtype=torch.bool)
    is_midi = type_of_id >= 0
    for r in range(allowed.shape[0]):
        inside = torch.zeros(n, dtype=torch.bool)
        inside[type_of_id[allowed[r, : type_of_id.numel()] & is_midi]] = True
        step = nxt * inside.to(torch.float32)[None, :]  # a step that stays inside the span
        walk = torch.eye(n)  # paths of d - 1 steps inside the span
        out[r, 0] = torch.eye(n, dtype=torch.bool)
        for d in range(1, REACH_MAX + 1):
            out[r, d] = (walk @ nxt) > 0
            walk = ((walk @ step) > 0).to(torch.float32)
    return out


def _type_flags(types: Sequence[int], n_types: int, device: torch.device | str) -> Tensor:
    flags = torch.zeros(n_types, dtype=torch.bool, device=device)
    flags[list(types)] = True
    return flags


def grammar_mask(
    positions: Tensor, ids: Tensor, masked: Tensor, rows: Tensor, tables: ConstraintTables
) -> Tensor:
    """bool [N, V]: MIDI ids whose type can follow the nearest committed token on the left and
    lead to the nearest committed token on the right in as many steps as lie between them
    (through types the position's modality row `rows` [N] allows: `ConstraintTables.reach`).
    Non-MIDI ids are left to the modality mask; a non-MIDI neighbour does not constrain."""
    assert tables.type_of_id is not None and tables.reach is not None
    type_of, reach = tables.type_of_id, tables.reach
    is_midi = type_of >= 0  # [V]
    id_type = type_of.clamp(min=0)
    T = ids.numel()
    idx = torch.arange(T, device=ids.device)
    known = ~masked
    last_known = torch.where(known, idx, -1).cummax(0).values  # [T] nearest known at or before
    next_known = torch.where(known, idx, T).flip(0).cummin(0).values.flip(0)  # ... at or after
    ok = torch.ones(positions.numel(), type_of.numel(), dtype=torch.bool, device=ids.device)

    left = torch.where(positions > 0, last_known[(positions - 1).clamp(min=0)], -1)
    left_type = type_of[ids[left.clamp(min=0)]]
    has = (left >= 0) & (left_type >= 0)
    if bool(has.any()):
        d = (positions - left)[has].clamp(max=REACH_MAX)
        may = reach[rows[has], d, left_type[has]]  # [n, n_types]: types reachable from left
        ok[has] &= may[:, id_type] | ~is_midi

    right = torch.where(positions < T - 1, next_known[(positions + 1).clamp(max=T - 1)], T)
    right_type = type_of[ids[right.clamp(max=T - 1)]]
    has = (right < T) & (right_type >= 0)
    if bool(has.any()):
        d = (right - positions)[has].clamp(max=REACH_MAX)
        may = reach[rows[has], d, :, right_type[has]]  # [n, n_types]: types reaching the right
        ok[has] &= may[:, id_type] | ~is_midi
    return ok


def onset_mask(
    positions: Tensor,
    ids: Tensor,
    masked: Tensor,
    tables: ConstraintTables,
) -> Tensor:
    """bool [N, V]: the onset rules of the MIDI grammar, from the committed tokens left of each
    position back to its bar line: no pitch already written at the current onset (a duplicate
    note), no Position at or before the bar's latest one (time runs backwards: notes pile up on
    earlier ones), none past the bar's end (from its time signature). A masked token on the way
    leaves what lies beyond it unknown, and unconstrained. Walks only positions whose left neighbour is committed (few per step)."""
    rules = tables.onsets
    assert tables.type_of_id is not None and rules is not None
    ok = torch.ones(positions.numel(), tables.type_of_id.numel(), dtype=torch.bool,
                    device=ids.device)  # fmt: skip
    type_of = tables.type_of_id[ids].tolist()  # [T] one lookup, walked in Python
    position_of = rules.position_of[ids].tolist()
    open_ = masked.tolist()
    onset, bar = rules.onset_types.tolist(), rules.bar_types.tolist()
    is_position = rules.position_of >= 0  # [V]
    for row, p in enumerate(positions.tolist()):
        pitches: list[int] = []
        in_onset, latest, bar_len = True, -1, 0
        j = p - 1
        while j >= 0 and not open_[j] and type_of[j] >= 0:
            t = type_of[j]
            if in_onset and onset[t]:
                in_onset = False
                if pitches:  # the onset's notes so far, all known
                    ok[row, pitches] = False
            elif in_onset and t == rules.pitch_type:
                pitches.append(int(ids[j]))
            latest = max(latest, position_of[j])
            if bar[t]:
                bar_len = int(rules.bar_positions[ids[j]])
                break
            j -= 1
        if latest >= 0:
            ok[row] &= ~is_position | (rules.position_of > latest)
        if bar_len > 0:
            ok[row] &= ~is_position | (rules.position_of < bar_len)
    return ok


def in_canvas_order(
    positions: Tensor, ids: Tensor, masked: Tensor, canvas_index: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(positions, ids, masked) of a reordered canvas's slots, mapped to canvas order. An anchor
    slot repeats a known token: both write the same committed id."""
    T = int(canvas_index.max()) + 1
    c_ids = ids.new_zeros(T).index_copy_(0, canvas_index, ids)
    c_masked = masked.new_ones(T).index_copy_(0, canvas_index, masked)
    return canvas_index[positions], c_ids, c_masked


def has_grammar_spans(tables: ConstraintTables, modality_rows: Tensor, grammar: bool) -> bool:
    """True when the MIDI grammar applies to some position: its constraints then read the
    neighbours, and cannot be applied as each modality's row of `tables.allowed` alone."""
    return bool(
        grammar and tables.type_of_id is not None and tables.grammar_row is not None
        and torch.isin(modality_rows, tables.grammar_row).any()
    )  # fmt: skip


def apply_constraints(
    logits: Tensor,
    positions: Tensor,
    ids: Tensor,
    masked: Tensor,
    modality_rows: Tensor,
    tables: ConstraintTables,
    grammar: bool = True,
    canvas_index: Tensor | None = None,
) -> Tensor:
    """Set to -inf every logit the position may not take.

    logits [N, V] belong to canvas `positions` [N]; `ids`/`masked` [T] are the current canvas and
    which of its positions are still open; `modality_rows` [T] index `tables.allowed`. MASK and PAD
    are never allowed. In a grammar span the MIDI grammar narrows the modality mask, unless that
    would leave nothing (neighbours the grammar cannot bridge in the room between them): then
    the modality mask alone; then `onset_mask` narrows it further, unless that would leave
    nothing. `canvas_index` [T] (slot -> canvas position) says where each slot of a reordered
    canvas sits: the grammar reads neighbours in canvas order.
    """
    allowed = tables.allowed[modality_rows[positions]]  # [N, V]
    if grammar and tables.type_of_id is not None and tables.grammar_row is not None:
        in_span = torch.isin(modality_rows[positions], tables.grammar_row)
        if bool(in_span.any()):
            at, rows = positions[in_span], modality_rows[positions[in_span]]
            if canvas_index is not None:
                at, ids, masked = in_canvas_order(at, ids, masked, canvas_index)
            g = allowed[in_span] & grammar_mask(at, ids, masked, rows, tables)
            feasible = g.any(dim=-1, keepdim=True)
            allowed[in_span] = torch.where(feasible, g, allowed[in_span])
            if tables.onsets is not None:  # the onset rules only where the grammar still holds
                g = allowed[in_span] & onset_mask(at, ids, masked, tables)
                feasible = g.any(dim=-1, keepdim=True)
                allowed[in_span] = torch.where(feasible, g, allowed[in_span])
    return logits.masked_fill(~allowed, float("-inf"))


def pin_masks(
    pinned: Sequence[tuple[int, Sequence[int]]], vocab_size: int, device: torch.device | str
) -> dict[int, Tensor]:
    """position -> bool [V]: the only ids that position may take (token healing's first token)."""
    out: dict[int, Tensor] = {}
    for pos, ids in pinned:
        allowed = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        allowed[torch.as_tensor(list(ids), dtype=torch.long, device=device)] = True
        out[int(pos)] = allowed
    return out


def apply_pinned(logits: Tensor, positions: Tensor, pinned: Mapping[int, Tensor]) -> Tensor:
    """Set to -inf, in the rows of pinned `positions`, every logit outside that position's ids
    (`pin_masks`); other rows are unchanged. logits [N, V] belong to canvas `positions` [N]."""
    if not pinned:
        return logits
    rows = [(r, pinned[p]) for r, p in enumerate(positions.tolist()) if p in pinned]
    if not rows:
        return logits
    logits = logits.clone()
    for r, allowed in rows:
        logits[r] = logits[r].masked_fill(~allowed, float("-inf"))
    return logits
