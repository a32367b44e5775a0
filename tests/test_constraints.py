"""The MIDI grammar of the sampler: a gap between fixed tokens is filled so that the whole canvas
parses, whatever the model prefers (models/constraints.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unmask.models.canvas import Canvas, Fixed, Masked
from unmask.models.constraints import REACH_MAX, SamplerVocab, apply_constraints
from unmask.models.network import Denoiser, ModelConfig
from unmask.models.sampler import generate
from unmask.models.sampler_params import SamplerParams

# ---- a four-type grammar shaped like ours: bar -> position -> pitch -> duration -> ... -----------
V = 48
PAD, MASK, BOS, EOS = 0, 1, 2, 3
BAR, POSITION, PITCH, DURATION = 0, 1, 2, 3
TYPE_OF_ID = np.full(V, -1, dtype=np.int64)
TYPE_OF_ID[8:12], TYPE_OF_ID[12:20], TYPE_OF_ID[20:40], TYPE_OF_ID[40:48] = 0, 1, 2, 3
NEXT = np.zeros((4, 4), dtype=bool)
NEXT[BAR, POSITION] = NEXT[POSITION, PITCH] = NEXT[PITCH, DURATION] = True
NEXT[DURATION, [BAR, POSITION, PITCH]] = True  # a chord repeats pitch + duration
MIDI = TYPE_OF_ID >= 0
NOTES = MIDI & (TYPE_OF_ID != BAR)  # a bar's notes: the bar lines are given


def vocab() -> SamplerVocab:
    return SamplerVocab(
        mask_id=MASK, eos_id=EOS, pad_id=PAD,
        modality_masks={"midi": MIDI, "midi_notes": NOTES},
        midi_type_of_id=TYPE_OF_ID, midi_allowed_next=NEXT,
    )  # fmt: skip


def errors(ids: list[int]) -> int:
    types = [int(TYPE_OF_ID[i]) for i in ids if TYPE_OF_ID[i] >= 0]
    return sum(not NEXT[a, b] for a, b in zip(types, types[1:], strict=False))


def bar_canvas(gaps: tuple[int, ...]) -> Canvas:
    """BOS, then per gap a fixed bar line and a masked run of notes, then a closing bar line."""
    segments: list = [Fixed([BOS])]
    for n in gaps:
        segments += [Fixed([8]), Masked(n, "midi_notes")]
    return Canvas([*segments, Fixed([8])])


def test_reach_counts_the_steps_between_two_types_through_the_span_types():
    v = vocab()
    reach = v.tables(V).reach
    notes, midi = v.modality_rows["midi_notes"], v.modality_rows["midi"]
    assert torch.equal(reach[notes, 1], torch.from_numpy(NEXT))
    # bar -> position pitch duration -> bar: 4 steps; a fifth token cannot close the bar
    assert [bool(reach[notes, d, BAR, BAR]) for d in (3, 4, 5, 6)] == [False, True, False, True]
    # duration -> bar -> position: only a span that may hold bar lines itself
    assert bool(reach[midi, 2, DURATION, POSITION]) and not bool(
        reach[notes, 2, DURATION, POSITION]
    )
    assert reach.shape[1] == REACH_MAX + 1


def test_a_note_is_not_started_where_the_gap_leaves_no_room_to_finish_it():
    """After bar position pitch duration, two slots remain before the bar line: a new position
    would need three (position pitch duration), so only a chord note (pitch) may come next."""
    v = vocab()
    notes = v.modality_rows["midi_notes"]
    ids = torch.tensor([BOS, 8, 12, 20, 40, MASK, MASK, 8])
    masked = ids == MASK
    rows = torch.tensor([0] + [notes] * 7)
    out = apply_constraints(torch.zeros(1, V), torch.tensor([5]), ids, masked, rows, v.tables(V))
    allowed = {int(TYPE_OF_ID[i]) for i in torch.isfinite(out[0]).nonzero().flatten().tolist()}
    assert allowed == {PITCH}


class PrefersPositions(torch.nn.Module):
    """Every position strongly prefers a Position token: the greedy choice that used to start a
    note in the last two slots of a bar and cut it off at the bar line."""

    def forward(self, ids, pad_mask=None, *, start_pos=0, past=None, use_cache=False,
                out_index=None):  # fmt: skip
        logits = torch.zeros(*ids.shape, V)
        logits[..., 12:20] = 10.0
        if out_index is not None:
            logits = logits.gather(1, out_index[:, :, None].expand(-1, -1, V))
        return logits, None


def test_left_to_right_bars_parse_even_when_the_model_prefers_an_impossible_token():
    canvas = bar_canvas((5, 5, 7))
    params = SamplerParams(gen_length=17, steps=17, position_score="left_to_right")
    out = generate(PrefersPositions(), canvas, params, vocab())
    assert errors(out.ids.tolist()) == 0
    bar_one = [int(TYPE_OF_ID[i]) for i in out.ids[2:7].tolist()]
    assert bar_one == [POSITION, PITCH, DURATION, PITCH, DURATION]


@pytest.mark.parametrize("seed", range(4))
def test_a_block_causal_model_fills_bar_gaps_in_infill_order_without_grammar_errors(seed):
    """Bar gaps followed by fixed bar lines run in infill order (known tokens first); the grammar
    must still read each gap's true neighbours, the bar line after it included."""
    torch.manual_seed(seed)
    model = Denoiser(
        ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                    attention="block_causal", block_size=4, token_shift=True, mask_id=MASK)
    ).eval()  # fmt: skip
    canvas = bar_canvas((9, 6, 11))
    params = SamplerParams(gen_length=26, steps=26, temperature=1.5, seed=seed)
    out = generate(model, canvas, params, vocab())
    ids = out.ids.tolist()
    assert errors(ids) == 0
    assert ids.count(8) == 4  # the bar lines stayed
