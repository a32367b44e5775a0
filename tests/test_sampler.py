"""Masked-diffusion sampler and AR baseline on a tiny random Denoiser and a fake 64-id vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unmask.errors import InvalidArgument
from unmask.models.ar_decoding import generate_ar
from unmask.models.canvas import Canvas, Fixed, Masked
from unmask.models.constraints import SamplerVocab, apply_constraints
from unmask.models.network import Denoiser, ModelConfig
from unmask.models.sampler import (
    SamplerState,
    StepEvent,
    collate_inputs,
    generate,
    plan_block_steps,
    planned_commits,
    run_batch,
    sample_tokens,
    sample_with_noise,
    score_positions,
    select_commits,
    select_remask,
    split_outputs,
    step_logits,
)
from unmask.models.sampler_params import ARParams, SamplerParams

# ---- fake vocabulary: 0 PAD, 1 MASK, 2 BOS, 3 EOS, 4..39 text, 40..63 MIDI ----------------------
V = 64
PAD, MASK, BOS, EOS = 0, 1, 2, 3
TEXT = np.zeros(V, dtype=bool)
TEXT[4:40] = True
TEXT[EOS] = True
MIDI = np.zeros(V, dtype=bool)
MIDI[40:64] = True
MIDI[EOS] = True
TYPE_OF_ID = np.full(V, -1, dtype=np.int64)
TYPE_OF_ID[40:48], TYPE_OF_ID[48:56], TYPE_OF_ID[56:64] = 0, 1, 2  # bar, pitch, duration
ALLOWED_NEXT = np.array(
    [[False, True, False], [False, False, True], [True, True, False]]
)  # bar -> pitch -> duration -> (bar | pitch)


def fake_vocab() -> SamplerVocab:
    return SamplerVocab(
        mask_id=MASK,
        eos_id=EOS,
        pad_id=PAD,
        modality_masks={"text": TEXT, "midi": MIDI},
        midi_type_of_id=TYPE_OF_ID,
        midi_allowed_next=ALLOWED_NEXT,
    )


def grammar_errors(ids: list[int]) -> int:
    types = [int(TYPE_OF_ID[i]) for i in ids]
    return sum(
        1
        for a, b in zip(types, types[1:], strict=False)
        if a >= 0 and b >= 0 and not ALLOWED_NEXT[a, b]
    )


@pytest.fixture(scope="module")
def model() -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(
        ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=96, mask_id=MASK)
    ).eval()


@pytest.fixture(scope="module")
def causal_model() -> Denoiser:
    torch.manual_seed(1)
    config = ModelConfig(
        vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=96, mask_id=MASK, causal=True
    )
    return Denoiser(config).eval()


class TableModel(torch.nn.Module):
    """Stub with the Denoiser signature whose logits are a fixed table per position."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table  # [max_len, V]

    def forward(
        self, ids, pad_mask=None, *, start_pos=0, past=None, use_cache=False, out_index=None
    ):
        T = ids.shape[1]
        logits = self.table[start_pos : start_pos + T][None].expand(ids.shape[0], T, -1)
        if out_index is not None:
            logits = logits.gather(1, out_index[:, :, None].expand(-1, -1, logits.shape[-1]))
        return logits, None


def prompt_canvas(n: int = 16, prompt=(BOS, 5, 6, 7), modality: str | None = "text") -> Canvas:
    return Canvas.from_prompt(list(prompt), n, modality)


def collect(events: list[StepEvent]):
    return lambda e: events.append(e)


# ---- behaviour ------------------------------------------------------------------------------


def test_fixed_tokens_never_change_in_an_infill_canvas(model):
    canvas = Canvas([Fixed([BOS, 5, 6]), Masked(6, "text"), Fixed([7, 8]), Masked(5, "text")])
    params = SamplerParams(
        gen_length=11, steps=6, block_length=4, temperature=1.0, remask_budget=3,
        remask_threshold=0.5, seed=3,
    )  # fmt: skip
    out = generate(model, canvas, params, fake_vocab())
    layout = canvas.layout(MASK)
    assert torch.equal(out.ids[layout.fixed], layout.ids[layout.fixed])
    assert not bool((out.ids == MASK).any())
    assert not bool(out.generated[layout.fixed].any())


def test_fixed_schedule_commits_exactly_the_planned_count_per_step(model):
    events: list[StepEvent] = []
    params = SamplerParams(gen_length=10, steps=4, stop_at_eos=False)
    generate(model, prompt_canvas(10), params, fake_vocab(), on_step=collect(events))
    assert [e.committed_positions.numel() for e in events] == [3, 3, 2, 2]

    events.clear()
    params = SamplerParams(gen_length=12, steps=6, block_length=4, stop_at_eos=False)
    generate(model, prompt_canvas(12), params, fake_vocab(), on_step=collect(events))
    assert [e.committed_positions.numel() for e in events] == [2] * 6
    assert [e.block for e in events] == [0, 0, 1, 1, 2, 2]


def test_block_steps_are_proportional_and_sum_to_steps():
    assert plan_block_steps(6, [4, 4, 4]) == [2, 2, 2]
    assert plan_block_steps(3, [100, 1, 1]) == [1, 1, 1]
    plan = plan_block_steps(7, [4, 4, 2])
    assert sum(plan) == 7 and all(1 <= s <= n for s, n in zip(plan, [4, 4, 2], strict=True))
    assert [planned_commits(r, s) for r, s in [(10, 4), (7, 3), (4, 2), (2, 1)]] == [3, 3, 2, 2]


def test_commits_stay_inside_the_current_block(model):
    events: list[StepEvent] = []
    canvas = prompt_canvas(12)
    params = SamplerParams(gen_length=12, steps=12, block_length=4, stop_at_eos=False)
    generate(model, canvas, params, fake_vocab(), on_step=collect(events))
    blocks = canvas.layout(MASK, 4).blocks
    for e in events:
        assert set(e.committed_positions.tolist()) <= set(blocks[e.block].tolist())


def test_threshold_schedule_commits_at_least_one_per_step_within_steps(model):
    events: list[StepEvent] = []
    params = SamplerParams(gen_length=12, steps=12, block_length=4, threshold=0.99)
    out = generate(model, prompt_canvas(12), params, fake_vocab(), on_step=collect(events))
    assert all(e.committed_positions.numel() >= 1 for e in events)
    assert out.steps <= params.steps and out.nfe == out.steps

    # a threshold every position passes commits a whole block per step
    events.clear()
    params = SamplerParams(
        gen_length=12, steps=12, block_length=4, threshold=1e-9, stop_at_eos=False
    )
    out = generate(model, prompt_canvas(12), params, fake_vocab(), on_step=collect(events))
    assert [e.committed_positions.numel() for e in events] == [4, 4, 4]
    assert out.tokens_per_forward == 4.0


def test_midi_span_only_gets_midi_ids_and_grammar_holds_even_for_random_logits():
    torch.manual_seed(0)
    stub = TableModel(torch.randn(64, V) * 20)  # strongly prefers arbitrary (mostly illegal) ids
    canvas = Canvas([Fixed([BOS, 5]), Masked(20, "midi"), Fixed([6])])
    params = SamplerParams(gen_length=20, steps=20, temperature=2.0, stop_at_eos=False, seed=1)
    out = generate(stub, canvas, params, fake_vocab())
    span = out.ids[2:22].tolist()
    assert all(MIDI[i] for i in span)
    # one commit per step: each new token saw both committed neighbours
    assert grammar_errors(span) == 0


def test_text_span_never_gets_midi_ids_mask_or_pad():
    torch.manual_seed(0)
    table = torch.randn(64, V)
    table[:, 40:] += 50  # the model wants MIDI ids everywhere
    table[:, [MASK, PAD]] += 100
    out = generate(
        TableModel(table), prompt_canvas(8), SamplerParams(gen_length=8, steps=4), fake_vocab()
    )
    assert all(TEXT[i] for i in out.ids[4:].tolist())


def test_apply_constraints_masks_per_position_modality():
    vocab = fake_vocab()
    tables = vocab.tables(V)
    ids = torch.tensor([BOS, MASK, MASK])
    masked = torch.tensor([False, True, True])
    rows = torch.tensor([0, vocab.modality_rows["text"], vocab.modality_rows["midi"]])
    out = apply_constraints(torch.zeros(3, V), torch.arange(3), ids, masked, rows, tables)
    finite = torch.isfinite(out)
    assert not finite[:, MASK].any() and not finite[:, PAD].any()
    assert torch.equal(finite[1], torch.from_numpy(TEXT))
    assert torch.equal(finite[2], torch.from_numpy(MIDI))


def test_grammar_mask_follows_the_committed_left_neighbour():
    vocab = fake_vocab()
    midi_row = vocab.modality_rows["midi"]
    ids = torch.tensor([44, MASK])  # a "bar" token, then an open MIDI position
    out = apply_constraints(
        torch.zeros(1, V), torch.tensor([1]), ids, torch.tensor([False, True]),
        torch.tensor([midi_row, midi_row]), vocab.tables(V),
    )  # fmt: skip
    allowed = torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert allowed == [EOS, *range(48, 56)]  # only "pitch" ids (and EOS) may follow "bar"


def test_eos_stops_generation_after_its_block_and_pads_the_rest():
    table = torch.zeros(64, V)
    table[:, 10] = 5.0  # token 10 everywhere ...
    table[4 + 5, EOS] = 10.0  # ... except EOS at generated position 5 (block 1 of 4-wide blocks)
    params = SamplerParams(gen_length=16, steps=16, block_length=4)
    out = generate(TableModel(table), prompt_canvas(16), params, fake_vocab())
    assert out.finish_reason == "eos"
    gen = out.ids[4:].tolist()
    assert gen[:5] == [10] * 5 and gen[5] == EOS and gen[6:] == [PAD] * 10
    assert out.steps == 8 and out.nfe == 8  # two blocks of four one-token steps
    assert out.generated[4:].tolist() == [True] * 6 + [False] * 10


def test_without_stop_at_eos_every_block_is_generated():
    table = torch.zeros(64, V)
    table[:, EOS] = 10.0
    params = SamplerParams(gen_length=8, steps=4, block_length=4, stop_at_eos=False)
    out = generate(TableModel(table), prompt_canvas(8), params, fake_vocab())
    assert out.finish_reason == "length" and out.ids[4:].tolist() == [EOS] * 8


def test_same_seed_gives_identical_output_and_another_seed_differs(model):
    def run(seed: int) -> list[int]:
        params = SamplerParams(
            gen_length=16, steps=8, block_length=8, temperature=1.5, top_p=0.95, seed=seed,
            stop_at_eos=False,
        )  # fmt: skip
        return generate(model, prompt_canvas(16), params, fake_vocab()).ids.tolist()

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prefix_cache_equals_no_cache_for_a_causal_model(causal_model, temperature):
    widths: list[int] = []

    class Recorder(torch.nn.Module):
        def forward(self, ids, pad_mask=None, **kw):
            widths.append(ids.shape[1])
            return causal_model(ids, pad_mask, **kw)

    def run(mode: str, net: torch.nn.Module):
        params = SamplerParams(
            gen_length=12, steps=6, block_length=4, use_cache=mode, temperature=temperature,
            seed=5, stop_at_eos=False,
        )  # fmt: skip
        return generate(net, prompt_canvas(12), params, fake_vocab())

    plain, cached = run("none", causal_model), run("prefix", Recorder())
    assert torch.equal(plain.ids, cached.ids)
    assert plain.nfe == cached.nfe == 6
    # the first step of each block runs the whole canvas, the second only the block and its right
    assert widths == [16, 12, 16, 8, 16, 4]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_modes_on_the_bidirectional_model_keep_invariants(model, mode):
    events: list[StepEvent] = []
    canvas = Canvas([Fixed([BOS, 5]), Masked(12, "text"), Fixed([6, 7])])
    params = SamplerParams(
        gen_length=12, steps=6, block_length=4, use_cache=mode, temperature=1.0, stop_at_eos=False
    )
    out = generate(model, canvas, params, fake_vocab(), on_step=collect(events))
    assert out.ids[:2].tolist() == [BOS, 5] and out.ids[-2:].tolist() == [6, 7]
    assert all(TEXT[i] for i in out.ids[2:14].tolist())
    assert sum(e.committed_positions.numel() for e in events) == 12
    assert out.nfe == 6


def test_dual_cache_runs_only_the_block_after_its_first_step(model):
    state = SamplerState(
        prompt_canvas(12), SamplerParams(gen_length=12, steps=6, block_length=4, use_cache="dual"),
        fake_vocab(),
    )  # fmt: skip
    first = state.prepare_inputs()
    assert first.width == 16 and first.use_cache
    state.advance(*step_logits(model, first))
    second = state.prepare_inputs()
    assert (second.width, second.start_pos, second.past.length) == (4, 4, 12)


def test_hook_events_add_up_to_gen_length(model):
    events: list[StepEvent] = []
    params = SamplerParams(gen_length=13, steps=5, block_length=5, stop_at_eos=False)
    out = generate(model, prompt_canvas(13), params, fake_vocab(), on_step=collect(events))
    assert [e.step for e in events] == list(range(out.steps))
    committed = torch.cat([e.committed_positions for e in events])
    assert committed.numel() == 13 and committed.unique().numel() == 13
    last_of_block = events[1]  # block 0 (5 positions) has two steps: 3 then 2 commits
    assert last_of_block.tentative_positions.numel() == 0
    assert events[0].tentative_positions.numel() == 2
    assert torch.all(events[0].committed_confidence >= events[0].tentative_confidence.max())


def test_remask_reopens_at_most_the_budget_and_still_finishes(model):
    events: list[StepEvent] = []
    params = SamplerParams(
        gen_length=12, steps=8, block_length=6, remask_budget=3, remask_threshold=1.0,
        stop_at_eos=False,
    )  # fmt: skip
    out = generate(model, prompt_canvas(12), params, fake_vocab(), on_step=collect(events))
    reopened = sum(e.remasked_positions.numel() for e in events)
    assert reopened == 3  # threshold 1.0: every earlier commit qualifies, the budget binds
    assert sum(e.committed_positions.numel() for e in events) == 12 + reopened
    assert out.steps <= params.steps and not bool((out.ids == MASK).any())


def test_max_steps_ends_the_run_without_leaking_masks(model):
    params = SamplerParams(gen_length=12, steps=12, block_length=4, max_steps=3)
    out = generate(model, prompt_canvas(12), params, fake_vocab())
    assert out.finish_reason == "max_steps" and out.steps == 3
    assert not bool((out.ids == MASK).any())
    assert out.generated[4:8].all() and not out.generated[8:].any()


@pytest.mark.parametrize("mode", ["none", "prefix", "dual"])
def test_jobs_batched_in_one_forward_match_their_solo_runs(model, mode):
    """How an engine batches jobs: collate their windows and caches, one forward, split, advance."""
    vocab = fake_vocab()
    jobs = [
        (prompt_canvas(8), dict(gen_length=8, steps=4, block_length=4, seed=1)),
        (prompt_canvas(12, prompt=(BOS,)), dict(gen_length=12, steps=6, block_length=4)),
        (Canvas([Fixed([BOS, 5]), Masked(6, "midi"), Fixed([6])]), dict(gen_length=6, steps=6)),
    ]
    jobs = [(c, SamplerParams(**kw, use_cache=mode, stop_at_eos=False)) for c, kw in jobs]
    solo = [generate(model, c, p, vocab).ids.tolist() for c, p in jobs]
    states = [SamplerState(c, p, vocab) for c, p in jobs]
    forwards = 0
    with torch.inference_mode():
        while live := [s for s in states if not s.done]:
            batch = collate_inputs([s.prepare_inputs() for s in live], PAD)
            logits, cache = run_batch(model, batch)
            forwards += 1
            for s, (row_logits, row_cache) in zip(
                live, split_outputs(batch, logits, cache), strict=True
            ):
                s.advance(row_logits, row_cache)
    assert [s.result().ids.tolist() for s in states] == solo
    assert forwards == max(s.nfe for s in states)


def test_gen_length_must_match_the_canvas(model):
    with pytest.raises(InvalidArgument) as err:
        generate(model, prompt_canvas(8), SamplerParams(gen_length=9, steps=3), fake_vocab())
    assert err.value.field == "gen_length"


def test_unknown_span_modality_is_rejected(model):
    with pytest.raises(InvalidArgument) as err:
        generate(model, prompt_canvas(4, modality="speech"), SamplerParams(4, 2), fake_vocab())
    assert err.value.field == "modality"


# ---- step functions ---------------------------------------------------------------------------


def test_sample_tokens_greedy_and_degenerate_filters_pick_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, V)
    best = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_tokens(logits, 0.0), best)
    assert torch.equal(sample_tokens(logits, 1.0, top_k=1, generator=g), best)
    assert torch.equal(sample_tokens(logits, 1.0, top_p=1e-6, generator=g), best)


def test_sample_tokens_never_picks_a_filtered_id():
    logits = torch.zeros(200, V)
    logits[:, 10:13] = 3.0
    g = torch.Generator().manual_seed(0)
    out = sample_tokens(logits, 5.0, top_k=3, generator=g)
    assert set(out.tolist()) <= {10, 11, 12} and len(set(out.tolist())) == 3


def test_sampled_frequencies_follow_the_tempered_nucleus():
    # 5 ids with probabilities .4 .3 .15 .1 .05 at temperature 1; top_p 0.8 keeps the first
    # three (.4 + .3 < .8), renormalised to .47 .35 .18; at temperature 2 the weights flatten
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log().repeat(40_000, 1)
    g = torch.Generator().manual_seed(0)
    for temperature, top_p in ((1.0, 1.0), (1.0, 0.8), (2.0, 1.0)):
        want = (probs.log() / temperature).softmax(-1)
        if top_p < 1.0:
            want = torch.where(torch.arange(5) < 3, want, 0.0)
            want = want / want.sum()
        out = sample_tokens(logits, temperature, top_p=top_p, generator=g)
        freq = torch.bincount(out, minlength=5).double() / out.numel()
        assert (freq - want.double()).abs().max() < 0.01, (temperature, top_p, freq, want)


def test_sampling_leaves_the_callers_noise_as_it_was():
    torch.manual_seed(2)
    logits, u = torch.randn(3, V), torch.rand(3, V)
    before = u.clone()
    first = sample_with_noise(logits, 0.8, 0, 0.9, u)
    assert torch.equal(u, before)
    assert torch.equal(sample_with_noise(logits, 0.8, 0, 0.9, u), first)


def test_a_seed_gives_the_same_ids_one_row_at_a_time_or_all_at_once():
    torch.manual_seed(1)
    logits = torch.randn(6, V)
    together = sample_tokens(logits, 0.9, top_p=0.9, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    alone = torch.cat([sample_tokens(r[None], 0.9, top_p=0.9, generator=g) for r in logits])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("method", ["probability", "margin", "entropy"])
def test_scores_lie_in_unit_interval_and_rank_peaked_rows_first(method):
    logits = torch.zeros(2, V)
    logits[0, 5] = 10.0  # peaked
    logits[1, 5] = 0.5  # flat
    scores = score_positions(logits, torch.tensor([5, 5]), method)
    assert torch.all((scores >= 0) & (scores <= 1)) and scores[0] > scores[1]


def test_select_commits_takes_top_count_and_everything_over_threshold():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.95, 0.2])
    assert select_commits(scores, 2).tolist() == [1, 3]
    assert select_commits(scores, 1, threshold=0.4).tolist() == [1, 2, 3]
    assert select_commits(scores, 0, threshold=0.99).tolist() == [3]  # always at least one


def test_select_remask_respects_threshold_and_budget():
    conf = torch.tensor([0.05, 0.9, 0.01, 0.2])
    assert select_remask(conf, 0.1, 5).tolist() == [2, 0]
    assert select_remask(conf, 0.5, 1).tolist() == [2]
    assert select_remask(conf, 0.5, 0).numel() == 0


# ---- autoregressive baseline ------------------------------------------------------------------


def test_ar_with_kv_cache_equals_full_recompute(causal_model):
    def run(use_cache: bool):
        params = ARParams(max_new_tokens=12, temperature=1.0, seed=4, use_cache=use_cache)
        return generate_ar(causal_model, [BOS, 5, 6], params, fake_vocab(), modality="text")

    cached, plain = run(True), run(False)
    assert torch.equal(cached.ids, plain.ids)
    assert cached.nfe == plain.nfe == cached.steps
    assert all(TEXT[i] for i in cached.ids[3:].tolist())


def test_ar_stops_at_eos():
    table = torch.zeros(64, V)
    table[:, 9] = 5.0
    table[5, EOS] = 10.0  # logits at position 5 predict token 6
    out = generate_ar(
        TableModel(table), [BOS, 5, 6], ARParams(max_new_tokens=10, use_cache=False), fake_vocab()
    )
    assert out.finish_reason == "eos" and out.ids.tolist() == [BOS, 5, 6, 9, 9, 9, EOS]
    assert out.generated.tolist() == [False] * 3 + [True] * 4 and out.nfe == 4


@settings(max_examples=40, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 6)), min_size=1, max_size=3),
    block=st.integers(0, 5),
    threshold=st.none() | st.floats(0.01, 1.0),
    remask=st.integers(0, 3),
    seed=st.integers(0, 2**32),
    eos=st.booleans(),
)
def test_any_canvas_keeps_fixed_tokens_fills_every_mask_and_respects_steps(
    spans, block, threshold, remask, seed, eos
):
    segments = []
    for n_fixed, n_masked in spans:
        segments += [Fixed(range(4, 4 + n_fixed)), Masked(n_masked, "text")]
    canvas = Canvas([s for s in segments if len(s)])
    n = canvas.n_masked
    block = min(block, n)
    steps = max(-(-n // block) if block else 1, n // 2)
    params = SamplerParams(
        gen_length=n, steps=steps, block_length=block, threshold=threshold, remask_budget=min(remask, n),
        remask_threshold=0.5, temperature=1.0, seed=seed, stop_at_eos=eos,
    )  # fmt: skip
    table = torch.randn(64, V, generator=torch.Generator().manual_seed(seed)) * 3
    out = generate(TableModel(table), canvas, params, fake_vocab())
    layout = canvas.layout(MASK)
    assert torch.equal(out.ids[layout.fixed], layout.ids[layout.fixed])
    assert not bool((out.ids == MASK).any())
    assert out.steps <= steps and out.finish_reason in ("length", "eos")
    assert all(TEXT[i] or i == PAD for i in out.ids[~layout.fixed].tolist())
