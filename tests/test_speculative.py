"""Self-speculative decoding (models/speculative.py): the default sampler's distribution, in fewer
forward passes. The maths on small distributions, the whole decoder against the default sampler
(greedy: token for token; sampled: the exact joint distribution of a tiny model), and the Engine
running speculative jobs beside batched ones."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from public_fixtures import write_checkpoint
from test_block_diffusion import tiny
from test_sampler import BOS, EOS, fake_vocab

from unmask.engine.engine import SUCCEEDED, Engine
from unmask.engine.request import GenerationRequest
from unmask.errors import InvalidArgument
from unmask.models.canvas import Canvas, Fixed, Masked
from unmask.models.constraints import apply_constraints
from unmask.models.generation import Generator, default_model_dir
from unmask.models.sampler import filter_top_k, generate
from unmask.models.sampler_params import MODEL_DEFAULTABLE, SamplerParams
from unmask.models.speculative import SpeculativeDecoder, draw, speculative_unsupported, verify

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped() -> Generator:
    return Generator.load(default_model_dir("model"), dtype="float32")


def test_draw_follows_the_weights_and_never_picks_an_id_without_mass():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 2.0, 0.0, 6.0, 0.0]]).expand(8000, -1)  # unnormalised
    counts = torch.bincount(draw(probs, g), minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    assert abs(counts[3].item() / 8000 - 0.75) < 0.02


def test_verify_commits_each_token_with_its_targets_distribution():
    """One draft from q; p[0] its target, p[1] the target after it. The first committed token
    follows p[0] whatever q is (q has mass where p has none: such drafts are always rejected),
    the bonus token after an accepted draft follows p[1], and a draft is accepted with
    probability sum(min(p, q))."""
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.4, 0.4]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    n = 20_000
    first, bonus, accepted = Counter(), Counter(), 0
    for _ in range(n):
        d = int(draw(q, g)[0])
        out, kept = verify([d], q, p, g)
        assert len(out) == kept + 1
        first[out[0]] += 1
        if kept:
            accepted += 1
            bonus[out[1]] += 1
    assert first[3] == 0
    for i in range(4):
        assert abs(first[i] / n - float(p[0, i])) < 0.015, (i, first)
        assert abs(bonus[i] / accepted - float(p[1, i])) < 0.02, (i, bonus)
    assert abs(accepted / n - 0.5) < 0.015  # min(.5,.1) + min(.3,.2) + min(.2,.3) + 0


@pytest.mark.parametrize(
    ("modality", "prompt"),
    [("text", "It was a truth universally"), ("code", "def mean(values):\n"), ("midi", None),
     ("text", "Mr. [MASK:9] said that [MASK:12] in the morning.")],
    ids=["text", "code", "midi-bars", "text-infill"],
)  # fmt: skip
def test_greedy_speculative_writes_the_default_samplers_tokens(shipped, modality, prompt):
    """At temperature 0 the targets are one-hot: every row of every forward must predict what
    the default sampler's step predicts there, or the tokens differ. Prompts end mid-block, the
    runs cross blocks, the MIDI grammar applies, and MIDI bars and infill run in infill order
    (slots) with fixed tokens between the open ones."""
    params = SamplerParams(gen_length=40, temperature=0.0, seed=0,
                           unset=tuple(k for k in MODEL_DEFAULTABLE if k != "temperature"))  # fmt: skip
    if "[MASK" in prompt if prompt else False:
        job = shipped.prepare_infill(modality, prompt, dataclasses.replace(params, gen_length=21))
    else:
        job = shipped.prepare_generate(modality, prompt, params)
    spec = dataclasses.replace(job, params=dataclasses.replace(job.params, speculative=True))
    default, fast = shipped.run(job), shipped.run(spec)
    assert fast.ids == default.ids
    assert fast.nfe < default.nfe  # drafts were accepted: fewer forwards for the same tokens


@torch.inference_mode()
@pytest.mark.parametrize(
    ("shift", "after"), [(True, 5), (True, 8), (False, 8), (False, 19)],
    ids=["shift-first-slot", "shift-mid-span", "no-shift-first-slot", "no-shift-mid-span"],
)  # fmt: skip
def test_greedy_speculative_ends_spans_at_an_eos_as_the_default_does(shift, after):
    """A tiny model whose EOS outranks a token it likes to repeat: greedy runs hit EOS at the
    first slot, mid-span and in the first gap of an infill (whose second gap goes on), with
    and without token shift (SDAR's layout: each slot predicts itself). PAD after the EOS, the
    finish reason and every token equal the default sampler's."""
    vocab = fake_vocab()
    model = tiny(seed=1, shift=shift)  # no shift: SDAR's layout, each slot predicts itself
    model.head.weight[EOS] = model.head.weight[after] * 1.02  # tied: also EOS's embedding
    canvases = [Canvas([Fixed([BOS, 4, 5]), Masked(13, "text")]),
                Canvas([Fixed([BOS, 4, 5]), Masked(6, "text"), Fixed([7, 8]), Masked(6, "text")])]  # fmt: skip
    reasons = []
    for canvas in canvases:
        n = canvas.n_masked
        params = SamplerParams(gen_length=n, steps=n, position_score="left_to_right",
                               temperature=0.0)  # fmt: skip
        default = generate(model, canvas, params, vocab)
        dec = SpeculativeDecoder(model, canvas, params, vocab, min_draft_prob=0.0)
        while not dec.done:
            dec.decode_step()
        fast = dec.result()
        assert fast.ids.tolist() == default.ids.tolist()
        assert fast.generated.tolist() == default.generated.tolist()
        assert fast.finish_reason == default.finish_reason
        reasons.append(fast.finish_reason)
    assert "eos" in reasons


@pytest.mark.parametrize("family", ["fast_dllm_v2", "sdar"])
def test_public_block_causal_checkpoints_decode_speculatively_as_by_default(tmp_path, family):
    """The two public block-causal layouts (Fast-dLLM v2 with token shift, SDAR without),
    loaded through their family adapters: greedy speculative decoding writes the default
    sampler's tokens."""
    gen = Generator.load(write_checkpoint(tmp_path / family, family), dtype="float32")
    params = SamplerParams(gen_length=12, steps=12, position_score="left_to_right",
                           temperature=0.0)  # fmt: skip
    job = gen.prepare_generate("text", "def add(a, b):", params)
    spec = dataclasses.replace(job, params=dataclasses.replace(job.params, speculative=True))
    assert gen.run(spec).ids == gen.run(job).ids


def _exact_joint(model, canvas: Canvas, n: int, top_k: int) -> dict[tuple[int, ...], float]:
    """The default sampler's joint distribution of the first n tokens, position by position
    from uncached forwards of the whole canvas (token shift: position j reads output j - 1;
    without it, output j)."""
    vocab = fake_vocab()
    tables = vocab.tables(model.config.vocab_size)
    layout = canvas.layout(vocab.mask_id)
    rows = torch.tensor([vocab.modality_rows[m] for m in layout.modality])
    start = int((~layout.fixed).nonzero()[0])
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], mass: float) -> None:
        if len(prefix) == n:
            out[prefix] = mass
            return
        ids = layout.ids.clone()
        ids[start : start + len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        masked = ids == vocab.mask_id
        pos = start + len(prefix)
        at = pos - int(model.config.token_shift)
        logits = model(ids[None])[0][0, at : at + 1]
        logits = apply_constraints(logits, torch.tensor([pos]), ids, masked, rows, tables)
        probs = filter_top_k(logits, top_k).softmax(dim=-1)[0]
        for t in probs.nonzero().flatten().tolist():
            walk((*prefix, t), mass * float(probs[t]))

    walk((), 1.0)
    return out


@torch.inference_mode()
@pytest.mark.parametrize("shift", [True, False], ids=["token-shift", "no-shift"])
def test_sampled_speculative_has_the_default_samplers_joint_distribution(shift):
    """Three tokens across a block boundary from a tiny block-causal model (top-k 3: 27
    outcomes): the speculative decoder's frequencies fit the exact joint distribution of the
    default sampler (chi-square), and so do the default sampler's own (the reference is right)."""
    model = tiny(block_size=4, shift=shift, seed=3)
    vocab = fake_vocab()
    canvas = Canvas([Fixed([BOS, 4, 5]), Masked(3, "text")])
    exact = _exact_joint(model, canvas, 3, top_k=3)
    assert abs(sum(exact.values()) - 1) < 1e-5 and len(exact) == 27

    def chi2(counts: Counter, n: int) -> float:
        return sum((counts[k] - n * p) ** 2 / (n * p) for k, p in exact.items())

    n, accepted = 1500, 0
    spec, plain = Counter(), Counter()
    for seed in range(n):
        params = SamplerParams(gen_length=3, steps=3, position_score="left_to_right",
                               temperature=1.0, top_k=3, seed=seed, stop_at_eos=False)  # fmt: skip
        dec = SpeculativeDecoder(model, canvas, params, vocab, min_draft_prob=0.0)
        while not dec.done:
            dec.decode_step()
        accepted += dec.accepted
        spec[tuple(dec.result().ids[3:6].tolist())] += 1
        plain[tuple(generate(model, canvas, params, vocab).ids[3:6].tolist())] += 1
    assert set(spec) <= set(exact) and set(plain) <= set(exact)
    assert accepted > 50  # the rows that verify drafts were exercised
    # 26 degrees of freedom: 60 is exceeded with probability ~1e-4 when the fit is right
    assert chi2(plain, n) < 60
    assert chi2(spec, n) < 60


def test_speculative_refuses_what_it_cannot_run_and_names_the_field():
    lr = SamplerParams(gen_length=4, steps=4, position_score="left_to_right")
    assert speculative_unsupported(tiny(), lr) is None
    assert "block-causal" in speculative_unsupported(tiny(attention="full"), lr)
    for bad in (dict(steps=2), dict(position_score="probability"), dict(threshold=0.9),
                dict(remask_budget=1), dict(max_steps=3)):  # fmt: skip
        assert speculative_unsupported(tiny(), dataclasses.replace(lr, **bad)) is not None
    plain = Canvas([Fixed([BOS]), Masked(4, "text")])
    with pytest.raises(InvalidArgument) as err:
        SpeculativeDecoder(tiny(), plain, dataclasses.replace(lr, steps=2), fake_vocab())
    assert err.value.field == "speculative"
    with pytest.raises(InvalidArgument) as err:
        SamplerParams(speculative="yes")
    assert err.value.field == "speculative"
    ar = Generator.load(default_model_dir("model-ar"))
    job = ar.prepare_generate("text", "Hi", SamplerParams(gen_length=4, steps=4, speculative=True))
    with pytest.raises(InvalidArgument, match="not an AR one") as err:
        ar.run(job)
    assert err.value.field == "speculative"


def test_the_engine_drafts_for_a_lone_speculative_job_and_batches_it_with_others(shipped):
    """Alone, a speculative job verifies drafts: step events commit several positions at once,
    in order, with a block event for every block. Beside another job its rows join the batched
    forward as plain left-to-right steps (more rows would cost more than they save), and the
    job next to it writes what it writes alone."""

    def req(seed: int, speculative: bool) -> GenerationRequest:
        params = SamplerParams(gen_length=24, seed=seed, speculative=speculative,
                               unset=MODEL_DEFAULTABLE)  # fmt: skip
        return GenerationRequest("midi", params=params, progress=True)

    with Engine(shipped, max_batch=4) as engine:
        handle = engine.submit(req(0, True))
        events = list(handle.events(timeout=60))
        lone = handle.result(timeout=60)
        alone = engine.run_one(req(1, False))
        before = engine.forward_passes
        pair = [engine.submit(req(1, False)), engine.submit(req(0, True))]
        results = [h.result(timeout=60) for h in pair]
        forwards = engine.forward_passes - before
    assert lone.status == SUCCEEDED and lone.output_midi[:4] == b"MThd"
    steps = [e for e in events if e["type"] == "step"]
    committed = [p for e in steps for p, _, _ in e["committed"]]
    assert committed == sorted(set(committed)) and len(committed) == 24  # in order, each once
    assert max(len(e["committed"]) for e in steps) > 1
    assert lone.usage["nfe"] == len(steps) < 24
    blocks = [e["index"] for e in events if e["type"] == "block"]
    assert blocks == list(range(len(blocks))) and len(blocks) >= 24 // 4

    assert [r.status for r in results] == [SUCCEEDED, SUCCEEDED]
    assert forwards < results[0].usage["nfe"] + results[1].usage["nfe"]  # shared forwards
    assert results[1].usage["nfe"] > lone.usage["nfe"]  # plain steps while not alone
    assert results[0].output_midi == alone.output_midi
