"""Sampling a block-causal (block-diffusion) model with its exact KV cache.

The canvas is cut into the model's blocks by absolute position (block k = positions
[k*B, (k+1)*B), as in training). Blocks are generated left to right; inside the current block the
usual pipeline runs (constraints, sampling, scoring, fixed-count or threshold commits, remasking
inside the block). Every step forwards only

    window = canvas[cache_len : end of the current block]

attending to the cache of everything before it. The cache holds whole finished blocks only: their
keys/values were computed from clean (committed) tokens and never change, so the cache is exact,
not an approximation. The first step of a block also carries the blocks finished since the last
cache update (they are clean context in the same forward, attended block-causally) and adds them
to the cache — no extra forward pass per block.

Infill (gaps followed by known text): the canvas is run in *infill order*, as in training
(models/block_diffusion.py): the known tokens first, then each gap region as [anchor ; region],
every slot with its true RoPE position. The state then works on that reordered canvas (slots);
events and the result are mapped back to canvas positions. Masked runs separated by at most
`MERGE_FIXED` known tokens (MIDI structure inside a bar, a short word between two gaps) form one
region, in which those known tokens stay as given.

Token shift (a model converted from the AR one): the prediction for position i is the output at
i - 1. For the first position of a block that output belongs to the last (clean) position of the
previous block; it is computed in the block's first step and kept for the later steps.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from unmask.errors import InvalidArgument
from unmask.models.block_diffusion import gap_runs, infill_order
from unmask.models.canvas import Canvas, Fixed, Masked, Segment
from unmask.models.constraints import SamplerVocab
from unmask.models.network import KVCache
from unmask.models.sampler import (
    Draw,
    SampleResult,
    SamplerState,
    StepEvent,
    StepInputs,
)
from unmask.models.sampler_params import SamplerParams

MERGE_FIXED = 4  # known tokens between two masked runs that still join them into one gap region


def gap_regions(masked: Tensor) -> Tensor:
    """bool [T]: the gap regions of a canvas (masked runs, joined across short known runs)."""
    regions = masked.clone()
    runs = gap_runs(masked)
    for (_, end), (start, _) in zip(runs, runs[1:], strict=False):
        if start - end <= MERGE_FIXED:
            regions[end:start] = True
    return regions


def needs_infill_order(masked: Tensor) -> bool:
    """True when a known token follows a masked one (plain continuation runs in order)."""
    idx = masked.nonzero().flatten()
    return bool(idx.numel()) and bool((~masked[int(idx[0]) :]).any())


def reorder_canvas(canvas: Canvas, mask_id: int) -> tuple[Canvas, Tensor]:
    """The canvas in infill order: (reordered canvas, RoPE position of each of its slots [T'])."""
    layout = canvas.layout(mask_id)
    masked = ~layout.fixed
    order, in_region = infill_order(gap_regions(masked))
    pins = dict(layout.pinned)  # a pinned position starts its own span, keeping its pin
    segments: list[Segment] = []
    fixed_run: list[int] = []
    k = 0
    while k < order.numel():
        pos = int(order[k])
        if bool(in_region[k]) and bool(masked[pos]):
            if fixed_run:
                segments.append(Fixed(fixed_run))
                fixed_run = []
            n = 1
            while (
                k + n < order.numel()
                and bool(in_region[k + n])
                and bool(masked[int(order[k + n])])
                and int(order[k + n]) == pos + n
                and layout.modality[int(order[k + n])] == layout.modality[pos]
                and int(order[k + n]) not in pins
            ):
                n += 1
            segments.append(Masked(n, layout.modality[pos], pins.get(pos, ())))
            k += n
        else:
            fixed_run.append(int(layout.ids[pos]))
            k += 1
    if fixed_run:
        segments.append(Fixed(fixed_run))
    return Canvas(segments), order


def grid_blocks(masked_positions: Tensor, block_size: int) -> list[Tensor]:
    """The masked positions grouped by the model's absolute block grid, left to right."""
    if masked_positions.numel() == 0:
        return []
    blk = masked_positions // block_size
    _, counts = torch.unique_consecutive(blk, return_counts=True)
    return list(torch.split(masked_positions, counts.tolist()))


def steps_per_block(params: SamplerParams, sizes: list[int]) -> list[int]:
    """`steps` over gen_length sets the tokens per step; every block gets 1..size steps."""
    rate = params.steps / max(params.gen_length, 1)  # steps per token
    return [min(n, max(1, round(n * rate))) for n in sizes]


class BlockCausalState(SamplerState):
    """A SamplerState for a model with attention="block_causal" (see the module docstring)."""

    def __init__(
        self,
        canvas: Canvas,
        params: SamplerParams,
        vocab: SamplerVocab,
        *,
        block_size: int,
        token_shift: bool,
        device: torch.device | str = "cpu",
    ) -> None:
        self.original = canvas.layout(vocab.mask_id, None, device)
        self.rope_positions: Tensor | None = None  # slot -> canvas position (infill order)
        if needs_infill_order(~self.original.fixed):
            canvas, order = reorder_canvas(canvas, vocab.mask_id)
            self.rope_positions = order.to(device)
        # the parent's blocks follow params.block_length; ours follow the model's grid
        super().__init__(canvas, replace(params, block_length=None), vocab, device=device)
        self.params = params
        self.canvas_index = self.rope_positions  # the grammar reads neighbours in canvas order
        self.block_size = block_size
        self.token_shift = token_shift
        self.blocks = grid_blocks(torch.nonzero(~self.layout.fixed).flatten(), block_size)
        self.block_steps = steps_per_block(params, [b.numel() for b in self.blocks])
        self.cache_len = 0  # positions [0, cache_len) are in self.cache (whole blocks)
        self.first_logits: Tensor | None = None  # shift: the prediction for the block's start
        self._window: tuple[int, int, int] | None = None  # (lo, hi, first output position)

    def block_bounds(self) -> tuple[int, int]:
        """[lo, hi): the grid block holding the current block's positions."""
        lo = int(self.blocks[self.block][0]) // self.block_size * self.block_size
        return lo, min(lo + self.block_size, self.length)

    def prepare_inputs(self) -> StepInputs:
        if self.done:
            raise InvalidArgument("the job has finished", field="state")
        lo, hi = self.block_bounds()
        start = self.cache_len
        # the vocabulary head runs only where a prediction is read: the block's open positions
        # (all of the block while remasking may re-open committed ones)
        if self.remask_left > 0:
            need = torch.arange(lo, hi, device=self.device)
        else:
            need = lo + self.masked[lo:hi].nonzero().flatten()
            n_read = self.read_positions(need.numel())  # e.g. only the leftmost, left to right
            if n_read is not None:
                need = need[:n_read]
        # token shift: position j is predicted by the output at j - 1; the block start's
        # prediction (output lo - 1, a finished block) is only in the block's first window
        src = need - 1 if self.token_shift else need
        src = src[src >= start]
        rope = self.rope_positions
        inputs = StepInputs(
            self.ids[None, start:hi],
            start,
            self.cache,
            use_cache=start < lo,  # finished blocks in the window: cache them now
            positions=rope[None, start:hi] if rope is not None else None,
            out_positions=src - start,
        )
        self._window = (lo, hi, start)
        self._pending = inputs
        return inputs

    def propose(self, logits: Tensor, cache: KVCache | None = None) -> Draw:
        inputs, window = self._pending, self._window
        if inputs is None or window is None or inputs.out_positions is None:
            raise InvalidArgument("call prepare_inputs() before advance()", field="state")
        lo, hi, start = window
        logits = logits.reshape(-1, logits.shape[-1])[: inputs.n_out]
        if logits.shape[0] != inputs.n_out:
            raise InvalidArgument(
                f"expected logits for {inputs.n_out} positions", field="logits", value=logits.shape
            )
        if inputs.use_cache:
            if cache is None:
                raise InvalidArgument("this step asked for a KVCache", field="cache")
            # cache = past ++ window (positions 0..hi-1): keep the whole blocks before this one
            self.cache = cache.truncate(lo)
            self.cache_len = lo
        predicted = inputs.out_positions + start + int(self.token_shift)  # canvas positions
        # the parent's step reads logits [hi - lo, V] by canvas position; rows it never reads
        # (committed positions, when nothing can be re-opened) stay zero
        block_logits = logits.new_zeros(hi - lo, logits.shape[-1])
        block_logits[predicted - lo] = logits
        if self.token_shift:
            at_lo = (predicted == lo).nonzero().flatten()
            if at_lo.numel():  # this forward saw the previous block's last position
                self.first_logits = logits[int(at_lo[0])]
            elif bool(self.masked[lo]) or self.remask_left > 0:
                first = self.first_logits
                if first is None:
                    if lo != 0 or not self.layout.fixed[0]:
                        raise InvalidArgument(
                            "no prediction kept for the block start", field="state"
                        )
                    first = torch.zeros_like(logits[0])  # position 0 (BOS) is never predicted
                block_logits[0] = first
        # the parent's step reads logits of canvas positions [lo, hi) from a window starting at lo
        self._pending = StepInputs(
            self.ids[None, lo:hi], lo, None, use_cache=False, out_len=hi - lo
        )
        self._window = None
        return super().propose(block_logits)

    def finish_step(self, draw: Draw, tokens: Tensor, conf: Tensor) -> StepEvent:
        event = super().finish_step(draw, tokens, conf)
        if self.rope_positions is None:
            return event
        at = self.rope_positions  # events speak of canvas positions, not slots
        return replace(
            event,
            committed_positions=at[event.committed_positions],
            tentative_positions=at[event.tentative_positions],
            remasked_positions=at[event.remasked_positions],
        )

    def result(self) -> SampleResult:
        res = super().result()
        if self.rope_positions is None:
            return res
        # back to canvas order: every canvas position that was masked has exactly one slot
        slots = (~self.layout.fixed).nonzero().flatten()
        at = self.rope_positions[slots]
        ids = self.original.ids.clone()
        ids[at] = res.ids[slots]
        generated = torch.zeros_like(self.original.fixed)
        generated[at] = res.generated[slots]
        return replace(res, ids=ids, generated=generated)

    def _finish_block(self) -> None:
        cache, cache_len = self.cache, self.cache_len
        super()._finish_block()  # the parent drops its (approximate) cache here; ours is exact
        if not self.done:
            self.cache, self.cache_len = cache, cache_len


def new_state(
    model: torch.nn.Module,
    canvas: Canvas,
    params: SamplerParams,
    vocab: SamplerVocab,
    device: torch.device | str = "cpu",
) -> SamplerState:
    """The per-job sampler state that fits the model's attention pattern."""
    config = getattr(model, "config", None)
    if getattr(config, "attention", "full") == "block_causal":
        return BlockCausalState(
            canvas,
            params,
            vocab,
            block_size=int(config.block_size),
            token_shift=bool(config.token_shift),
            device=device,
        )
    if getattr(config, "token_shift", False):
        raise InvalidArgument("token_shift needs block_causal attention", field="model")
    return SamplerState(canvas, params, vocab, device=device)
