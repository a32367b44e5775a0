"""Self-speculative decoding of a block-causal model: the default sampler's distribution in fewer
forward passes.

The model's default sampler (left to right, one token per step) draws position j from its target
p_j: the constrained, tempered, filtered prediction at j given everything left of j, the rest of
the block still masked. The same forward also predicts j+1, j+2, ... while j is still masked:
those predictions q are *drafts*, free by-products of the step. The next forward verifies them
all at once. Its batch holds one row per draft:

    row r = the committed tokens + the first r drafts + MASK for the rest

so row r's prediction at the r-th draft's position is exactly that position's target p given the
drafts before it. Draft d is accepted with probability min(1, p(d) / q(d)); the first rejected
position is drawn from the residual max(p - q, 0) (normalised) and the forward's work stops
there; when every draft is accepted, the last row gives one more token from its target
(speculative sampling: Leviathan et al. 2023, Chen et al. 2023, here with the model as its own
draft). Every committed token has the default sampler's distribution, so the output has the
default's quality by construction; a seed gives other tokens than the default sampler's.

Block-causal attention makes the rows cheap to build: a row may carry the next block too (the
current block never attends to it), and the finished blocks in the window are the same in every
row, so their keys/values (the exact cache) come from row 0. One forward commits between 1 token
and the drafts + 1. Rows are not free on a CPU (5 rows of 12 slots cost ~1.6x one row of 4 on
2 cores), so only drafts the model is fairly sure of are proposed (`MIN_DRAFT_PROB`), and the
Engine turns drafting off while other jobs share the forward (docs/speed.md §2b).

Infill and MIDI bars run as the default sampler runs them (models/block_sampler.py): on the
canvas in infill order (slots), left to right over the slots still open, fixed slots in between
kept as given. A block holding an EOS ends its span when the block is complete, as there; the
chain of a forward stops at that block's end, since the default sampler's next tokens would
see PAD after the EOS, not the tokens this forward drew there.

Scope: the defaults' shape (left to right, one token per step, no threshold, no remasking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from unmask.errors import InvalidArgument
from unmask.models.block_sampler import grid_blocks, needs_infill_order, reorder_canvas
from unmask.models.canvas import Canvas
from unmask.models.constraints import (
    SamplerVocab,
    apply_constraints,
    apply_pinned,
    has_grammar_spans,
    pin_masks,
)
from unmask.models.network import KVCache
from unmask.models.sampler import (
    SampleResult,
    StepEvent,
    StepInputs,
    check_fits,
    filtered_probs,
    model_device,
)
from unmask.models.sampler_params import SamplerParams

MAX_DRAFTS = 4  # drafts verified per forward (rows = drafts + 1); the shipped model's block size
# drafts are proposed while the model's chance of writing all of them stays at least this. In
# one sweep on 2 CPU cores the shipped model then ran text / code / MIDI at 1.06x / 1.18x / 1.22x
# the default sampler's speed, and at 0.87x / 0.90x / 1.23x when every draft was proposed
MIN_DRAFT_PROB = 0.2
_NONE = torch.zeros(0, dtype=torch.long)


def speculative_unsupported(model: torch.nn.Module, params: SamplerParams) -> str | None:
    """Why a job cannot run speculatively (None: it can)."""
    config = getattr(model, "config", None)
    if getattr(config, "attention", None) != "block_causal":
        return "needs a block-causal model"
    p = params
    if p.position_score != "left_to_right" or p.steps < p.gen_length:
        return "needs left-to-right decoding at one token per step"
    if p.threshold is not None or p.threshold_factor is not None or p.remask_budget > 0:
        return "does not combine with threshold, threshold_factor or remasking"
    if p.max_steps is not None:
        return "does not combine with max_steps"
    return None


def token_probs(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """The distribution [N, V] the default sampler draws from, given constrained logits [N, V]
    (`filtered_probs`, normalised; temperature 0 puts all mass on the argmax)."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = filtered_probs(logits, temperature, top_k, top_p)
    return probs if top_p >= 1.0 else probs / probs.sum(dim=-1, keepdim=True)


def draw(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One id per row of probs [N, V] (rows need not sum to 1), by inverse CDF: the first id
    whose cumulative mass reaches u * total, u in (0, 1], so an id of zero mass is never drawn.
    (The default samplers race exponentials so that a batched job writes what it writes alone;
    a speculative job's tokens depend on the load anyway: it drafts only while alone.)"""
    cdf = probs.cumsum(dim=-1)
    u = 1.0 - torch.rand(probs.shape[0], 1, generator=generator).to(probs.device)
    return (cdf < u * cdf[:, -1:]).sum(dim=-1).clamp_(max=probs.shape[-1] - 1)


def verify(
    drafts: list[int], q: Tensor, p: Tensor, generator: torch.Generator
) -> tuple[list[int], int]:
    """Speculative sampling over one chain: (tokens to commit, drafts accepted).

    drafts [D] were drawn from q [D, V]; p [D + 1, V] are the targets at the same positions plus
    one more (p[r] given drafts[:r]). Draft r is kept with probability min(1, p/q); the first
    rejected position gets a draw from max(p - q, 0); with all kept, p[D] gives one more token.
    Each committed token then has its target's distribution."""
    D = len(drafts)
    u = torch.rand(D, generator=generator).tolist()
    if D:
        at, d = torch.arange(D, device=p.device), torch.tensor(drafts, device=p.device)
        ratio_ok = (torch.tensor(u, device=p.device) * q[at, d] < p[at, d]).tolist()  # u < p/q
    out: list[int] = []
    for r in range(D):
        if ratio_ok[r]:
            out.append(drafts[r])
            continue
        residual = (p[r] - q[r]).clamp_(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: p itself
            residual = p[r]
        out.append(int(draw(residual[None], generator)[0]))
        return out, r
    out.append(int(draw(p[D : D + 1], generator)[0]))
    return out, D


@dataclass
class _Drafts:
    """Proposals for the next open slots: ids [D] at `slots` [D], drawn from q [D, V]."""

    slots: list[int]
    ids: list[int]
    q: Tensor


_NO_DRAFTS = _Drafts([], [], torch.zeros(0))


@dataclass(frozen=True, eq=False)
class _Rows:
    """One step's forward: `model(window, start_pos=start, past=cache (every row), ...)`."""

    window: Tensor  # [R, W] slots [start, start + W): row r holds the first r drafts
    start: int
    use_cache: bool  # finished blocks in the window: cache them now
    out_index: Tensor  # [K] window offsets read in every row (slot c + k's prediction)
    positions: Tensor | None  # [R, W] RoPE positions of a reordered canvas
    decided: list[int]  # the open slot each row decides
    block: int  # the block the step started in


class SpeculativeDecoder:
    """One job: `decode_step()` runs one forward and commits 1..drafts + 1 tokens, until
    `done`. The Engine reads `ids`, `blocks`, `block`, `nfe` and `step` as a SamplerState's
    (slots of the canvas in infill order, as BlockCausalState's)."""

    def __init__(self, model: torch.nn.Module, canvas: Canvas, params: SamplerParams,
                 vocab: SamplerVocab, max_drafts: int = MAX_DRAFTS,
                 min_draft_prob: float = MIN_DRAFT_PROB) -> None:  # fmt: skip
        why = speculative_unsupported(model, params)
        if why is not None:
            raise InvalidArgument(f"speculative decoding {why}", field="speculative")
        check_fits(model, canvas.length, "gen_length")
        if canvas.n_masked != params.gen_length:
            raise InvalidArgument(f"must equal the canvas's masked positions ({canvas.n_masked})",
                                  field="gen_length", value=params.gen_length)  # fmt: skip
        self.model, self.params, self.vocab = model, params, vocab
        self.device = model_device(model)
        self.block_size = int(model.config.block_size)
        self.shift = int(bool(model.config.token_shift))  # prediction for i at output i - shift
        self.max_drafts, self.min_draft_prob = max_drafts, min_draft_prob
        self.original = canvas.layout(vocab.mask_id, None, self.device)
        self.rope: Tensor | None = None  # slot -> canvas position (infill order)
        if needs_infill_order(~self.original.fixed):
            canvas, order = reorder_canvas(canvas, vocab.mask_id)
            self.rope = order.to(self.device)
        self.layout = layout = canvas.layout(vocab.mask_id, None, self.device)
        self.ids = layout.ids.clone()
        self.masked = ~layout.fixed
        self.cleared = torch.zeros_like(self.masked)  # PAD after an EOS
        self.length = layout.length
        # the model's grid blocks over the open slots (the Engine's block events)
        self.blocks = grid_blocks(self.masked.nonzero().flatten(), self.block_size)
        self._block_index = {int(b[0]) // self.block_size: i for i, b in enumerate(self.blocks)}
        self._last_kept = int(self.masked.nonzero()[0]) if self.blocks else 0
        rows = vocab.modality_rows
        self.modality_rows = torch.tensor(
            [rows[m] for m in layout.modality], dtype=torch.long, device=self.device
        )
        self.vocab_size = int(model.config.vocab_size)
        self.tables = vocab.tables(self.vocab_size, self.device)
        self.pinned = pin_masks(layout.pinned, self.vocab_size, self.device)
        self.grammar = has_grammar_spans(self.tables, self.modality_rows, params.grammar)
        self.generator = torch.Generator(device="cpu").manual_seed(params.seed)
        self.cache: KVCache | None = None
        self.cache_len = 0  # slots [0, cache_len) are cached (whole finished blocks)
        self.drafts = _NO_DRAFTS
        self.tentative = False  # no guesses for open slots are ever reported
        # draft and verify (True), or take plain left-to-right steps: the Engine turns it off
        # while other jobs share the forward (rows then cost more than they save, docs/speed.md).
        # Either way each token has the default's distribution; only the seed's tokens change.
        self.drafting = True
        self._pending: _Rows | None = None
        self.nfe = 0
        self.step = 0
        self.accepted = 0  # drafts accepted, over the whole job
        self.saw_eos = False
        self.finish_reason: str | None = None if self.blocks else "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def block(self) -> int:
        """Index in `blocks` of the block being decoded; once done, one past the block that
        holds the last token kept."""
        slot = self._last_kept if self.done else self._open()[0]
        return self._block_index[slot // self.block_size] + int(self.done)

    def _open(self) -> list[int]:
        return self.masked.nonzero().flatten().tolist()

    def _constrained(self, logits: Tensor, slots: Tensor, ids: Tensor, masked: Tensor) -> Tensor:
        """fp32 logits [N, V] at `slots` with what each may not take at -inf."""
        constrained = apply_constraints(
            logits.float(), slots, ids, masked, self.modality_rows, self.tables,
            self.params.grammar, self.rope,
        )  # fmt: skip
        return apply_pinned(constrained, slots, self.pinned)

    def _probs(self, logits: Tensor, slots: Tensor, ids: Tensor, masked: Tensor) -> Tensor:
        """[N, V]: what the default sampler draws from at `slots`, given a row's canvas."""
        p = self.params
        constrained = self._constrained(logits, slots, ids, masked)
        return token_probs(constrained, p.temperature, p.top_k, p.top_p)

    @torch.inference_mode()
    def decode_step(self) -> StepEvent:
        """One forward of its own: verify the drafts, commit, draw new drafts."""
        rows = self.prepare_rows()
        R = rows.window.shape[0]
        past = None
        if self.cache is not None:  # every row attends to the same cache: views, no copies
            past = KVCache(
                [(k.expand(R, -1, -1, -1), v.expand(R, -1, -1, -1)) for k, v in self.cache.layers],
                self.cache.pad_mask.expand(R, -1),
            )
        extra = {} if rows.positions is None else {"positions": rows.positions}
        logits, cache = self.model(
            rows.window, start_pos=rows.start, past=past, use_cache=rows.use_cache,
            out_index=rows.out_index[None].expand(R, -1), **extra,
        )  # fmt: skip
        return self.advance_rows(logits, cache)

    def prepare_rows(self) -> _Rows:
        """The rows of this step's forward (see the module docstring); then `advance_rows`."""
        if self.done:
            raise InvalidArgument("the job has finished", field="state")
        B, shift = self.block_size, self.shift
        if not self.drafting:  # a plain left-to-right step: whatever was drafted goes unused
            self.drafts = _NO_DRAFTS
        drafts = self.drafts
        R = len(drafts.ids) + 1
        # row r decides open slot r: drafts[:r] in place, the rest still masked
        decided = self._open()[:R]
        c = decided[0]
        # to the end of the last one's block; without token shift also the next block's first
        # slot, still masked, whose own output drafts it (with shift, the block's last output does)
        hi = min(self.length, (decided[-1] // B + 1) * B + 1 - shift)
        start = self.cache_len
        window = self.ids[start:hi].repeat(R, 1)  # [R, W]
        if drafts.ids:
            at = torch.tensor(drafts.slots, device=self.device) - start
            ids = torch.tensor(drafts.ids, device=self.device)
            for r in range(1, R):
                window[r, at[:r]] = ids[:r]
        rows = _Rows(
            window, start, start < c // B * B,
            # every output from the one predicting slot c to the window's end, in every row:
            # one vocabulary head over rows x positions costs little more than over one
            torch.arange(c - shift - start, hi - start, device=self.device),
            None if self.rope is None else self.rope[None, start:hi].expand(R, -1),
            decided, self.block,
        )  # fmt: skip
        self._pending = rows
        return rows

    def step_inputs(self, rows: _Rows) -> list[StepInputs]:
        """The rows as one StepInputs each, for the Engine to batch with other jobs' rows (the
        first asks for the cache when finished blocks are in the window)."""
        return [
            StepInputs(
                rows.window[r : r + 1],
                rows.start,
                self.cache,
                rows.use_cache and r == 0,
                positions=None if rows.positions is None else rows.positions[r : r + 1],
                out_positions=rows.out_index,
            )  # fmt: skip
            for r in range(rows.window.shape[0])
        ]

    def advance_rows(self, logits: Tensor, cache: KVCache | None = None) -> StepEvent:
        """Finish the step from the rows' logits [R, K, V] (row r's prediction for slot c + k)
        and, when the rows asked for it, the first row's cache of its past + window."""
        rows, self._pending = self._pending, None
        if rows is None:
            raise InvalidArgument("call prepare_rows() before advance_rows()", field="state")
        decided, drafts = rows.decided, self.drafts
        c, R = decided[0], len(decided)
        self.nfe += 1
        if rows.use_cache:
            if cache is None:
                raise InvalidArgument("this step asked for a KVCache", field="cache")
            # finished blocks in the window: the same in every row; keep them
            lo = c // self.block_size * self.block_size
            self.cache = cache.truncate(lo).select(slice(0, 1))
            self.cache_len = lo
        rows_at = torch.arange(R, device=self.device)
        at = torch.tensor(decided, device=self.device) - c
        targets = self._targets(logits[rows_at, at], decided, drafts.ids)
        tokens, kept = verify(drafts.ids, drafts.q, targets, self.generator)
        n = self._commit(decided[: len(tokens)], tokens)
        chosen = torch.tensor(tokens[:n], device=self.device)
        if not self.done and self.drafting:
            self._draw_drafts(logits[kept], c)
        slots = torch.tensor(decided[:n], device=self.device)
        event = StepEvent(
            self.step, rows.block, self.rope[slots] if self.rope is not None else slots,
            chosen, targets[rows_at[:n], chosen], _NONE, _NONE, torch.zeros(0), _NONE,
        )  # fmt: skip
        self.accepted += min(kept, n)
        self.step += 1
        return event

    def _targets(self, logits: Tensor, slots: list[int], drafts: list[int]) -> Tensor:
        """p [R, V]: row r's target at slots[r], given the committed tokens + drafts[:r]."""
        at = torch.tensor(slots, device=self.device)
        if not self.grammar:  # the constraints do not read the neighbours: all rows at once
            return self._probs(logits, at, self.ids, self.masked)
        ids, masked = self.ids.clone(), self.masked.clone()
        out = []
        for r in range(len(slots)):
            if r:
                ids[slots[r - 1]], masked[slots[r - 1]] = drafts[r - 1], False
            out.append(self._probs(logits[r : r + 1], at[r : r + 1], ids, masked))
        return torch.cat(out)

    def _commit(self, slots: list[int], tokens: list[int]) -> int:
        """Commit tokens at open slots in order; how many were kept. As in the default sampler,
        a block that completes holding an EOS ends its span (what follows in the span becomes
        PAD), and this forward's chain stops at that block's end."""
        B = self.block_size
        n = 0
        for slot, token in zip(slots, tokens, strict=True):
            self.ids[slot], self.masked[slot] = token, False
            n += 1
            self._last_kept = slot
            blk = self.blocks[self._block_index[slot // B]]
            if bool(self.masked[blk].any()) or not self.params.stop_at_eos:
                continue
            eos = blk[self.ids[blk] == self.vocab.eos_id]
            if eos.numel():  # the block is complete and holds an EOS
                self.saw_eos = True
                span = self.layout.span
                after = torch.arange(self.length, device=self.device) > int(eos.min())
                clear = after & (span == span[int(eos.min())]) & ~self.layout.fixed
                self.ids[clear] = self.vocab.pad_id
                self.masked[clear] = False
                self.cleared |= clear
                break
        if not bool(self.masked.any()):
            self.finish_reason = "eos" if self.saw_eos else "length"
        return n

    def _draw_drafts(self, logits: Tensor, c: int) -> None:
        """New drafts for the next open slots from the stopping row's logits [K, V] (slot c + k;
        their left neighbours still masked in that row), each drawn from its own filtered
        prediction q. Only as many as the model is confident of: while the product of each
        slot's top probability stays at least `min_draft_prob` (a row costs the forward more
        than an unlikely draft saves). With a grammar, drawn left to right, each seeing the
        drafts before it. Nothing here reads the targets, so the output's distribution is the
        default sampler's whatever this proposes; it only sets how many drafts get accepted."""
        open_slots = self._open()[:-1]  # the last open slot: always a target's draw
        slots = [s for s in open_slots[: self.max_drafts] if s - c < logits.shape[0]]
        if not slots:
            self.drafts = _NO_DRAFTS
            return
        at = torch.tensor(slots, device=self.device)
        rows = self._constrained(logits[at - c], at, self.ids, self.masked)
        n = len(slots)
        if self.min_draft_prob > 0:
            z = rows / (self.params.temperature or 1.0)
            top = (z.max(dim=-1).values - z.logsumexp(dim=-1)).exp()
            n = int((top.cumprod(0) >= self.min_draft_prob).sum())
        if n == 0:
            self.drafts = _NO_DRAFTS
            return
        p = self.params
        if not self.grammar:  # constraints that do not read the neighbours: all rows at once
            q = token_probs(rows[:n], p.temperature, p.top_k, p.top_p)
            d = draw(q, self.generator).tolist()
        else:
            ids, masked = self.ids.clone(), self.masked.clone()
            qs, d = [], []
            for k in range(n):
                qs.append(self._probs(logits[at[k : k + 1] - c], at[k : k + 1], ids, masked))
                d.append(int(draw(qs[-1], self.generator)[0]))
                ids[slots[k]], masked[slots[k]] = d[-1], False
            q = torch.cat(qs)
        self.drafts = _Drafts(slots[:n], d, q)

    def result(self) -> SampleResult:
        generated = ~self.layout.fixed & ~self.cleared
        n = int(generated.sum())
        ids = self.ids.clone()
        if self.rope is not None:  # back to canvas order (as BlockCausalState.result)
            slots = (~self.layout.fixed).nonzero().flatten()
            at = self.rope[slots]
            ids = self.original.ids.clone()
            ids[at] = self.ids[slots]
            gen = torch.zeros_like(self.original.fixed)
            gen[at] = generated[slots]
            generated = gen
        return SampleResult(
            ids=ids,
            generated=generated,
            nfe=self.nfe,
            steps=self.step,
            finish_reason=self.finish_reason or "length",
            tokens_per_forward=n / max(self.nfe, 1),
        )
