"""Block diffusion: the block-causal attention pattern, the BD3 objective and its exact-cache sampler,
on tiny random models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_sampler import BOS, EOS, MASK, PAD, V, fake_vocab

from unmask.models.block_diffusion import (
    _layout,
    block_diffusion_loss,
    block_nelbo,
    block_order_nll,
    infill_order,
    lengthen_gaps,
    reorder_for_infill,
)
from unmask.models.block_sampler import BlockCausalState, grid_blocks, new_state
from unmask.models.canvas import Canvas, Fixed, Masked
from unmask.models.network import Denoiser, ModelConfig
from unmask.models.objective import ar_loss, ar_nll
from unmask.models.sampler import (
    collate_inputs,
    generate,
    run_batch,
    sample_draws,
    split_outputs,
    step_logits,
)
from unmask.models.sampler_params import SamplerParams
from unmask.models.train import TrainConfig


def tiny(attention: str = "block_causal", block_size: int = 4, shift: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, attention=attention,
        block_size=block_size, token_shift=shift, mask_id=MASK,
    )  # fmt: skip
    return Denoiser(cfg).eval()


def rows(B: int = 3, L: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, 40, (B, L), generator=g)
    x[:, 0] = BOS
    targets = torch.ones_like(x, dtype=torch.bool)
    targets[:, :2] = False
    return x, targets


def test_block_causal_mask_sees_own_block_both_ways_and_earlier_blocks_only():
    m = tiny(block_size=3)
    pos = torch.arange(9)[None]
    mask, _ = m._attention_mask(None, None, pos)
    allowed = mask[0, 0]
    blk = torch.arange(9) // 3
    assert torch.equal(allowed, blk[None, :] <= blk[:, None])


def test_a_later_block_cannot_change_an_earlier_blocks_outputs():
    m = tiny()
    x, _ = rows(1, 16)
    y = x.clone()
    y[0, 12:] = 5  # change the last block only
    a, b = m.logits(x), m.logits(y)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_training_layout_masks_noisy_and_clean_copies_as_bd3():
    L, bs = 8, 4
    positions, mask = _layout(L, bs, 1, "cpu")
    assert positions.tolist() == list(range(L)) * 2
    noisy_q_block1 = mask[4]  # noisy position 4 (block 1)
    assert noisy_q_block1[4:8].all() and not noisy_q_block1[:4].any()  # own noisy block only
    assert noisy_q_block1[8:12].all() and not noisy_q_block1[12:].any()  # clean block 0 only
    clean_q = mask[8 + 5]  # clean position 5 (block 1)
    assert not clean_q[:8].any() and clean_q[8:16].all()  # never a noisy key; clean blocks <= 1


def test_block_size_one_with_token_shift_is_exactly_the_ar_loss():
    ar = tiny("causal", shift=False)
    bd = tiny("block_causal", block_size=1, shift=True)
    bd.load_state_dict(ar.state_dict())
    x, targets = rows()
    expected, _ = ar_loss(ar.logits(x), x, targets)
    got, _ = block_diffusion_loss(bd, x, targets, MASK, block_size=1, t_fixed=1.0)
    assert abs(got.item() - expected.item()) < 1e-4
    # and the NELBO estimate at block size 1 matches the AR NLL within MC noise
    g = torch.Generator().manual_seed(0)
    nelbo, _ = block_nelbo(bd, x, targets, MASK, block_size=1, samples=64, generator=g)
    nll, _ = ar_nll(ar, x, targets)
    assert abs(nelbo - nll) < 0.05 * nll


def test_left_to_right_order_nll_is_the_sum_of_one_token_steps_of_the_plain_forward():
    m = tiny(block_size=4)
    x, targets = rows(2, 16)
    _, row = block_order_nll(m, x, targets, MASK, block_size=4)
    expected = torch.zeros(2)
    for i in targets[0].nonzero().flatten().tolist():  # decode position i: its block's tokens
        start = i - i % 4  # from i on are still MASK, earlier blocks are clean
        z = x.clone()
        z[:, i : start + 4] = torch.where(targets[:, i : start + 4], MASK, z[:, i : start + 4])
        logp = m.logits(z)[:, i - 1].float().log_softmax(-1)  # token shift: output i-1 -> token i
        expected -= logp.gather(1, x[:, i : i + 1]).squeeze(1) * targets[:, i]
    assert torch.allclose(row, expected, atol=1e-4)


def test_order_nll_of_a_subset_of_targets_keeps_the_decoding_order():
    m = tiny(block_size=4)
    x, targets = rows(2, 16)
    _, whole = block_order_nll(m, x, targets, MASK, block_size=4)
    some = targets & (torch.arange(16) % 3 == 0)  # loss at these only, every target still masked
    _, a = block_order_nll(m, x, targets, MASK, block_size=4, targets=some)
    _, b = block_order_nll(m, x, targets, MASK, block_size=4, targets=targets & ~some)
    assert torch.allclose(a + b, whole, atol=1e-4) and (a > 0).all()


def test_left_to_right_order_nll_at_block_size_one_is_the_ar_nll():
    ar = tiny("causal", shift=False)
    bd = tiny("block_causal", block_size=1, shift=True)
    bd.load_state_dict(ar.state_dict())
    x, targets = rows()
    got, _ = block_order_nll(bd, x, targets, MASK, block_size=1)
    assert abs(got - ar_nll(ar, x, targets)[0]) < 1e-4


def test_complementary_copies_give_every_target_a_loss_once():
    m = tiny()
    x, targets = rows()
    loss, stats = block_diffusion_loss(m, x, targets, MASK, block_size=4, complementary=True)
    assert int(stats.n_masked) == int(targets.sum())
    loss.backward()
    assert m.tok_emb.weight.grad is not None and torch.isfinite(loss)


def test_loss_is_computed_only_from_the_masked_tokens_and_their_clean_past():
    m = tiny()
    x, targets = rows(1, 16)
    only = torch.zeros_like(targets)
    only[0, 9] = True  # one target in block 2: depends on blocks 0-1 and block 2 (noisy)
    a, _ = block_diffusion_loss(m, x, only, MASK, block_size=4, t_fixed=1.0)
    y = x.clone()
    y[0, 12:] = 7  # a later block
    b, _ = block_diffusion_loss(m, y, only, MASK, block_size=4, t_fixed=1.0)
    assert abs(a.item() - b.item()) < 1e-6


def test_grid_blocks_follow_absolute_positions():
    blocks = grid_blocks(torch.tensor([5, 6, 7, 8, 9, 13]), 4)
    assert [b.tolist() for b in blocks] == [[5, 6, 7], [8, 9], [13]]


@pytest.mark.parametrize("shift", [True, False])
def test_cached_block_logits_equal_a_full_forward_at_every_step(shift):
    """The exact KV cache: each step's logits equal those of an uncached forward of the canvas."""
    m = tiny(shift=shift)
    canvas = Canvas([Fixed([BOS, 4, 5, 6, 7, 8]), Masked(13, "text"), Fixed([9, 10]), Masked(3)])
    params = SamplerParams(gen_length=16, steps=8)
    state = new_state(m, canvas, params, fake_vocab())
    assert isinstance(state, BlockCausalState)
    while not state.done:
        inputs = state.prepare_inputs()
        lo, hi = state.block_bounds()
        logits, cache = step_logits(m, inputs)
        rope = state.rope_positions
        assert rope is not None  # known text after a gap: the canvas runs in infill order
        full = m(state.ids[None, :hi], positions=rope[None, :hi])[0][0]
        at = inputs.start_pos + inputs.out_index()  # the outputs this step asked for
        # only where a still-masked position of the block is predicted (the head skips the rest)
        predicted = at + 1 if shift else at
        assert set(predicted.tolist()) <= set(range(lo, hi))
        assert all(bool(state.masked[p]) for p in predicted.tolist())
        assert torch.allclose(logits, full[at], atol=1e-4)
        state.advance(logits, cache)
    result = state.result()
    assert not (result.ids == MASK).any()
    assert result.ids[:6].tolist() == [BOS, 4, 5, 6, 7, 8]
    assert result.ids[19:21].tolist() == [9, 10]


def test_block_causal_jobs_batched_in_one_forward_match_their_solo_runs():
    m = tiny()
    vocab = fake_vocab()
    canvases = [
        Canvas([Fixed([BOS, 4, 5]), Masked(10, "text")]),
        Canvas([Fixed([BOS, 4, 5, 6, 7, 8, 9]), Masked(6, "text")]),
        Canvas([Fixed([BOS]), Masked(17, "text")]),
        Canvas([Fixed([BOS, 4, 5]), Masked(5, "text"), Fixed([7, 8, 9]), Masked(3, "text")]),
    ]
    params = [SamplerParams(gen_length=c.n_masked, steps=c.n_masked, seed=i) for i, c in
              enumerate(canvases)]  # fmt: skip
    solo = [generate(m, c, p, vocab).ids.tolist() for c, p in zip(canvases, params, strict=True)]
    states = [new_state(m, c, p, vocab) for c, p in zip(canvases, params, strict=True)]
    while not all(s.done for s in states):
        live = [s for s in states if not s.done]
        batch = collate_inputs([s.prepare_inputs() for s in live], 0)
        logits, cache = run_batch(m, batch)
        for s, (row_logits, row_cache) in zip(
            live, split_outputs(batch, logits, cache), strict=True
        ):
            s.advance(row_logits, row_cache)
    assert [s.result().ids.tolist() for s in states] == solo


def test_block_warmup_walks_the_sizes_then_stays_at_the_final_one():
    cfg = TrainConfig(
        objective="block_diffusion", block_size=4, block_warmup=[1, 2], block_warmup_share=0.2,
        max_steps=100,
    )  # fmt: skip
    sizes = [cfg.block_size_at(s) for s in range(100)]
    assert sizes[:10] == [1] * 10 and sizes[10:20] == [2] * 10 and set(sizes[20:]) == {4}
    model_cfg = cfg.model_config(V, MASK)
    assert model_cfg.attention == "block_causal" and model_cfg.token_shift


def test_infill_order_puts_known_tokens_first_then_anchor_and_gap():
    gaps = torch.zeros(10, dtype=torch.bool)
    gaps[3:5] = True
    gaps[7:8] = True
    order, is_gap = infill_order(gaps)
    assert order.tolist() == [0, 1, 2, 5, 6, 8, 9, 2, 3, 4, 6, 7]
    assert is_gap.tolist() == [False] * 7 + [False, True, True, False, True]
    order, is_gap = infill_order(gaps, length=10)  # a training row keeps its length
    assert len(order) == 10 and sorted(set(order[is_gap].tolist())) == [3, 4, 7]


def test_infill_order_keeps_the_row_length_when_a_gap_at_the_end_is_cut_away():
    """Two gaps need two anchor slots; the second gap fills the last two positions, so it is
    cut away entirely (a training crash once: the row came out one slot short)."""
    gaps = torch.zeros(10, dtype=torch.bool)
    gaps[3:5] = True
    gaps[8:10] = True
    order, is_gap = infill_order(gaps, length=10)
    assert len(order) == 10 and len(is_gap) == 10
    assert sorted(set(order[is_gap].tolist())) == [3, 4]  # the cut gap is never a target
    assert order[-1].item() == 8  # its first position fills the free slot, as context


def _lengthen(x, maskable, gaps, rows, share=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lengthen_gaps(x, maskable, gaps, rows, share=share, eos_id=EOS, pad_id=PAD,
                         generator=g)  # fmt: skip


def test_a_lengthened_gap_holds_its_text_then_eos_and_pad_and_the_right_side_moves_on():
    x, targets = rows(1, 16)
    gaps = torch.zeros_like(targets)
    gaps[0, 5:8] = True
    seen = set()
    for seed in range(12):
        ids, maskable, spans = _lengthen(x, targets & gaps, gaps, torch.tensor([True]), seed=seed)
        k = int(spans[0].sum()) - 3  # extra slots
        seen.add(k)
        assert 1 <= k <= 3 and ids.shape == x.shape
        assert ids[0, :8].tolist() == x[0, :8].tolist()  # left side and the gap's own text
        assert ids[0, 8 : 8 + k].tolist() == [EOS] + [PAD] * (k - 1)  # the end of the span
        assert ids[0, 8 + k :].tolist() == x[0, 8 : 16 - k].tolist()  # right side, k slots on
        assert spans[0].nonzero().flatten().tolist() == list(range(5, 8 + k))
        assert torch.equal(maskable, spans)  # the end-of-span slots are targets too
    assert seen == {1, 2, 3}


def test_only_chosen_gaps_are_lengthened_and_a_gap_ending_the_document_never():
    x, targets = rows(2, 16)
    gaps = torch.zeros_like(targets)
    gaps[:, 5:8] = True
    ids, maskable, spans = _lengthen(x, targets & gaps, gaps, torch.tensor([False, True]), 0.0)
    assert torch.equal(ids, x) and torch.equal(spans, gaps)  # share 0: nothing changes
    ids, _, spans = _lengthen(x, targets & gaps, gaps, torch.tensor([False, True]))
    assert torch.equal(ids[0], x[0]) and torch.equal(spans[0], gaps[0])  # row not chosen
    assert not torch.equal(ids[1], x[1])
    y = x.clone()
    y[:, 7], y[:, 8:] = EOS, PAD  # the gap holds the document's end
    ids, _, spans = _lengthen(y, targets & gaps, gaps, torch.tensor([True, True]))
    assert torch.equal(ids, y) and torch.equal(spans, gaps)


def test_an_eos_in_an_infill_gap_ends_that_gap_and_keeps_the_right_side():
    m = tiny()
    right = [9, 10, 11, 12, 13]
    canvas = Canvas([Fixed([BOS, 4, 5, 6]), Masked(2, "text"), Masked(6, "text", (EOS,)),
                     Fixed(right)])  # fmt: skip
    res = generate(m, canvas, SamplerParams(gen_length=8, steps=8), fake_vocab())
    ids = res.ids.tolist()
    assert ids[:4] == [BOS, 4, 5, 6] and ids[12:] == right
    assert ids[6] == EOS and ids[7:12] == [PAD] * 5  # the span ended at its EOS
    assert EOS not in ids[4:6] and PAD not in ids[4:6]


def test_a_target_weight_scales_only_the_loss_of_the_targets_it_weights():
    m = tiny()
    x, targets = rows(2, 16)
    base, _ = block_diffusion_loss(m, x, targets, MASK, block_size=4, t_fixed=1.0)
    twice, _ = block_diffusion_loss(m, x, targets, MASK, block_size=4, t_fixed=1.0,
                                    target_weight=torch.full(x.shape, 2.0))  # fmt: skip
    assert torch.allclose(twice, 2 * base)
    one = torch.ones(x.shape)
    one[1, 9] = 5.0  # one target of the second row
    _, a = block_diffusion_loss(m, x, targets, MASK, block_size=4, t_fixed=1.0)
    _, b = block_diffusion_loss(m, x, targets, MASK, block_size=4, t_fixed=1.0, target_weight=one)
    assert torch.allclose(a.row_loss[0], b.row_loss[0]) and b.row_loss[1] > a.row_loss[1]


def test_a_reordered_gap_sees_the_text_on_its_right():
    m = tiny()
    x, targets = rows(1, 16)
    gaps = torch.zeros_like(targets)
    gaps[0, 5:8] = True
    ids, maskable, positions = reorder_for_infill(x, targets, gaps, torch.tensor([True]))
    assert maskable.sum() == 3 and sorted(positions[0][maskable[0]].tolist()) == [5, 6, 7]
    a, _ = block_diffusion_loss(m, ids, maskable, MASK, block_size=4, t_fixed=1.0,
                                positions=positions)  # fmt: skip
    y = x.clone()
    y[0, 12] = 9  # a token right of the gap
    ids2, maskable2, positions2 = reorder_for_infill(y, targets, gaps, torch.tensor([True]))
    b, _ = block_diffusion_loss(m, ids2, maskable2, MASK, block_size=4, t_fixed=1.0,
                                positions=positions2)  # fmt: skip
    assert abs(a.item() - b.item()) > 1e-6  # the gap's loss depends on its right context


def test_infill_gaps_see_their_right_context_and_fixed_text_stays():
    m = tiny()
    vocab = fake_vocab()
    right_a, right_b = [9, 10, 11, 12, 13], [20, 21, 22, 23, 24]
    params = SamplerParams(gen_length=4, steps=4)
    outs = []
    for right in (right_a, right_b):
        canvas = Canvas([Fixed([BOS, 4, 5, 6]), Masked(4, "text"), Fixed(right)])
        res = generate(m, canvas, params, vocab)
        ids = res.ids.tolist()
        assert ids[:4] == [BOS, 4, 5, 6] and ids[8:] == right  # fixed text byte-identical
        assert res.generated.tolist() == [False] * 4 + [True] * 4 + [False] * 5
        outs.append(ids[4:8])
    # random weights: the gap's tokens depend on the text after it (left-only would not)
    logits_a = _gap_logits(m, right_a)
    logits_b = _gap_logits(m, right_b)
    assert not torch.allclose(logits_a, logits_b)


def _gap_logits(m, right):
    canvas = Canvas([Fixed([BOS, 4, 5, 6]), Masked(4, "text"), Fixed(right)])
    state = new_state(m, canvas, SamplerParams(gen_length=4, steps=4), fake_vocab())
    logits, _ = step_logits(m, state.prepare_inputs())
    return logits


def test_gap_regions_join_masked_runs_across_short_known_runs():
    from unmask.models.block_sampler import gap_regions

    masked = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert gap_regions(masked).tolist() == [bool(x) for x in [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1]]


def test_left_to_right_commits_the_leftmost_open_positions_of_the_block():
    from unmask.models.sampler import select_leftmost

    scores = torch.tensor([0.2, 0.95, 0.99, 0.1])
    assert select_leftmost(scores, 1).tolist() == [0]
    assert select_leftmost(scores, 1, threshold=0.9).tolist() == [0, 1, 2]
    m = tiny()
    canvas = Canvas([Fixed([BOS, 4]), Masked(10, "text")])
    params = SamplerParams(gen_length=10, steps=10, position_score="left_to_right")
    events = []
    generate(m, canvas, params, fake_vocab(), on_step=events.append)
    assert [e.committed_positions.tolist() for e in events] == [[i] for i in range(2, 12)]


def test_left_to_right_parallel_commits_keep_the_midi_grammar():
    from test_sampler import grammar_errors

    m = tiny(seed=3)
    canvas = Canvas([Fixed([BOS, 40]), Masked(18, "midi")])
    params = SamplerParams(gen_length=18, steps=6, position_score="left_to_right", temperature=1.0)
    for seed in range(3):
        res = generate(m, canvas, replace(params, seed=seed), fake_vocab())
        assert grammar_errors(res.ids[1:].tolist()) == 0


def test_tentative_guesses_ride_in_the_batched_sampling_as_the_argmax_and_its_probability():
    """A step event's guesses for the block's open rest are the argmax of each position's
    constrained logits and its probability, as computed job by job before; now they are a
    temperature-0 `Draw.guess` that `sample_draws` runs with every job's guesses at once."""
    m = tiny()
    canvas = Canvas([Fixed([BOS, 5, 6]), Masked(13, "text")])
    params = SamplerParams(gen_length=13, steps=13, position_score="left_to_right",
                           temperature=1.0, top_p=0.9, seed=3)  # fmt: skip
    states = [new_state(m, canvas, replace(params, seed=s), fake_vocab()) for s in (3, 4)]
    guessed = 0
    with torch.no_grad():
        while live := [s for s in states if not s.done]:
            draws, refs = [], []
            for state in live:
                inputs = state.prepare_inputs()
                logits, cache = step_logits(m, inputs)
                draw = state.propose(logits, cache)
                open_pos = state.blocks[state.block][state.masked[state.blocks[state.block]]]
                rest = open_pos[1:]
                assert (draw.guess is not None) == bool(rest.numel())
                # the logits the step reads, by canvas position from `first` (the block's)
                block_logits, first = state._step_state[0], state._step_state[1]
                ref = None
                if rest.numel():
                    ref = state._constrained(block_logits, rest, first, state._tables)
                draws.append(draw)
                refs.append(ref)
            for state, draw, ref, sampled in zip(live, draws, refs, sample_draws(draws),
                                                 strict=True):  # fmt: skip
                event = state.finish_step(draw, *sampled)
                if ref is None:
                    assert event.tentative_ids.numel() == 0
                    continue
                best = ref.argmax(dim=-1)
                assert event.tentative_ids.tolist() == best.tolist()
                torch.testing.assert_close(event.tentative_confidence,
                                           ref.softmax(dim=-1).gather(-1, best[:, None])[:, 0])  # fmt: skip
                guessed += 1
    assert guessed >= 4


def test_a_job_without_tentative_guesses_draws_the_same_tokens():
    """Left to right, one token a step: the guesses for the rest of the block are only for step
    events; a state told nobody reads them (a unary request) skips them and ends identical."""
    m = tiny()
    canvas = Canvas([Fixed([BOS, 5, 6]), Masked(13, "text")])
    params = SamplerParams(gen_length=13, steps=13, position_score="left_to_right",
                           temperature=1.0, top_p=0.9, seed=3)  # fmt: skip
    runs, head_rows = [], []
    for tentative in (True, False):
        state = new_state(m, canvas, params, fake_vocab())
        state.tentative = tentative
        events, rows_read = [], []
        with torch.no_grad():
            while not state.done:
                inputs = state.prepare_inputs()
                rows_read.append(int(inputs.out_positions.numel()))
                events.append(state.advance(*step_logits(m, inputs)))
        runs.append((state.result().ids.tolist(), events))
        head_rows.append(rows_read)
    (ids_a, ev_a), (ids_b, ev_b) = runs
    assert ids_a == ids_b
    # the vocabulary head ran over the block's open positions, then over the one committed
    assert sum(head_rows[0]) > len(head_rows[0]) and head_rows[1] == [1] * len(head_rows[1])
    assert any(e.tentative_positions.numel() for e in ev_a)
    assert all(e.tentative_positions.numel() == 0 for e in ev_b)
    assert [e.committed_positions.tolist() for e in ev_a] == [
        e.committed_positions.tolist() for e in ev_b
    ]
