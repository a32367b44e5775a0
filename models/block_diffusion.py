"""Block diffusion (BD3-LM): masked diffusion inside blocks, autoregressive across blocks.

The sequence x0 [B, L] is cut into blocks of `block_size` by position. Each block b gets its own
noise level t_b; each of its maskable tokens becomes MASK with probability t_b. The model
predicts block b's masked tokens from the noisy block itself (both ways) and the *clean* blocks
before it. Training does every block at once in one forward pass over a 2L layout
(or (k+1)L with k noisy copies, e.g. the complementary mask of Fast-dLLM v2):

    ids       = [ x_t (copy 1) ; ... ; x_t (copy k) ; x0 ]        [B, (k+1) L]
    positions = [ 0..L-1       ; ... ; 0..L-1       ; 0..L-1 ]    same RoPE for every copy
    mask      : noisy copy c, block b  -> its own block in copy c      (block-diagonal)
                                       -> clean blocks < b             (offset block-causal)
                clean block b          -> clean blocks <= b            (block-causal)

Clean queries never see noisy keys, so the clean half is exactly what a sampler's KV cache of
committed blocks holds. With `token_shift` (a model converted from the AR baseline) the target at
position i is read from the output at i - 1: inside a block from the noisy copy, for a block's
first position from the clean copy's last position of the previous block — at block size 1 this
is exactly the AR model's next-token loss (a test checks it).

Infill (FIM-style, as MMM moves bars to the end): a block-causal model cannot look right, so an
infill row is *reordered* (`reorder_for_infill`): the known tokens come first, in order, then each
gap as [anchor ; gap tokens], where the anchor is a copy of the token just before the gap. Every
token keeps its true RoPE position (`positions`), blocks follow the new order, and with token
shift the anchor's output predicts the gap's first token exactly as in left-to-right text. A gap
then sees the text on both sides of it. The sampler builds the same layout for [MASK:n] gaps.

Loss: sum over masked tokens of CE / t_b, divided by the number of maskable tokens (and copies):
the NELBO per token when t ~ U(0, 1]. Training clips t to [t_min, t_max] (BD3-LM: lower gradient
variance); evaluation uses the full range. Logits are computed only where a loss is taken.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmask.errors import InvalidArgument
from unmask.models.objective import LossStats, _rand


@lru_cache(maxsize=16)
def _layout(L: int, block_size: int, copies: int, device: str) -> tuple[Tensor, Tensor]:
    """(positions [(copies+1) L], attention mask [(copies+1) L, (copies+1) L] bool)."""
    blk = torch.arange(L, device=device) // block_size  # [L]
    same = blk[:, None] == blk[None, :]  # [L, L] query block == key block
    earlier = blk[None, :] < blk[:, None]  # key block < query block
    upto = blk[None, :] <= blk[:, None]  # key block <= query block
    n = copies + 1
    mask = torch.zeros(n * L, n * L, dtype=torch.bool, device=device)
    for c in range(copies):
        rows = slice(c * L, (c + 1) * L)
        mask[rows, rows] = same
        mask[rows, copies * L :] = earlier
    mask[copies * L :, copies * L :] = upto
    positions = torch.arange(L, device=device).repeat(n)
    return positions, mask


def gap_runs(gaps: Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool tensor."""
    if not bool(gaps.any()):
        return []
    g = torch.cat([gaps.new_zeros(1), gaps.to(torch.int8), gaps.new_zeros(1).to(torch.int8)])
    edges = torch.diff(g.to(torch.int8)).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2], strict=True))


def infill_order(gaps: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
    """The attention order of a row with gaps [T] bool (position 0 is never a gap):
    (source position of each slot [T'], whether the slot is a gap token [T']). Known positions
    first, then per gap its anchor (the position before it) and its positions. `length` keeps
    the row at that many slots: the last positions of the row are dropped to make room for the
    anchors (a training row keeps its shape)."""
    T = gaps.numel()
    runs = gap_runs(gaps)
    limit = T if length is None else length - len(runs)
    known = [i for i in range(min(T, limit)) if not bool(gaps[i])]
    order, is_gap = list(known), [False] * len(known)
    for start, end in runs:
        end = min(end, limit)
        if end <= start:
            continue
        order += [start - 1, *range(start, end)]
        is_gap += [False] + [True] * (end - start)
    if length is not None:
        # runs cut away entirely leave slots free: refill them with the positions past the limit,
        # as context that is never a target (the last slots: no target sees them)
        placed = set(order)
        rest = [i for i in range(limit, T) if i not in placed]
        order, is_gap = (order + rest)[:length], (is_gap + [False] * len(rest))[:length]
    dev = gaps.device
    return torch.tensor(order, dtype=torch.long, device=dev), torch.tensor(is_gap, device=dev)


def lengthen_gaps(
    ids: Tensor,
    maskable: Tensor,
    gaps: Tensor,
    rows: Tensor,
    *,
    share: float,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Variable-length infill: a user's [MASK:n] is rarely exactly as long as the text that fits,
    so the model must be able to end a gap early. In the selected rows [B] bool, each gap (a run
    of `gaps & maskable`) is, with probability `share`, given k extra slots (k uniform in 1..its
    length) right after its content, holding EOS then PAD: the end-of-span the sampler honours
    (an EOS ends its span; the span's rest becomes PAD). The right context moves k positions on;
    the row keeps its length L (its last ids fall off). Returns (ids, maskable, gaps) [B, L]."""
    if share <= 0:
        return ids, maskable, gaps
    L = ids.shape[1]
    ids, maskable, gaps = ids.clone(), maskable.clone(), gaps.clone()
    for b in rows.nonzero().flatten().tolist():
        for start, end in reversed(gap_runs(gaps[b] & maskable[b])):  # right to left: stable ends
            u = float(torch.rand((), generator=generator, device=generator.device))
            # a gap at the document's end ends with its EOS / PAD already
            if u >= share or end >= L or int(ids[b, end - 1]) in (eos_id, pad_id):
                continue
            k = 1 + int(
                torch.randint(end - start, (), generator=generator, device=generator.device)
            )
            filler = ids.new_full((k,), pad_id)
            filler[0] = eos_id
            yes = maskable.new_ones(k)
            ids[b] = torch.cat([ids[b, :end], filler, ids[b, end:]])[:L]
            maskable[b] = torch.cat([maskable[b, :end], yes, maskable[b, end:]])[:L]
            gaps[b] = torch.cat([gaps[b, :end], yes, gaps[b, end:]])[:L]
    return ids, maskable, gaps


def reorder_for_infill(
    ids: Tensor, maskable: Tensor, gaps: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Training rows in infill order (see the module docstring): rows [B] bool selects the rows to
    reorder, gaps [B, L] their gap positions. Returns (ids, maskable, positions) [B, L]; rows not
    selected keep their order (positions 0..L-1)."""
    B, L = ids.shape
    positions = torch.arange(L, device=ids.device).repeat(B, 1)
    ids, maskable = ids.clone(), maskable.clone()
    for b in rows.nonzero().flatten().tolist():
        row_gaps = gaps[b] & maskable[b]
        if not bool(row_gaps.any()):
            continue
        order, is_gap = infill_order(row_gaps, L)
        positions[b] = order
        maskable[b] = maskable[b][order] & is_gap  # anchors and known tokens are never targets
        ids[b] = ids[b][order]
    return ids, maskable, positions


def source_index(cols: Tensor, copy: int, copies: int, L: int, block_size: int, shift: bool):
    """Index in the (copies+1)L layout whose output predicts the target at position `cols`."""
    if not shift:
        return copy * L + cols
    first = cols % block_size == 0  # a block's first token: read from the clean previous position
    return torch.where(first, copies * L + cols - 1, copy * L + cols - 1)


def _masked_copies(
    x0: Tensor,
    maskable: Tensor,
    block_size: int,
    t_min: float,
    t_max: float,
    complementary: bool,
    generator: torch.Generator | None,
    t_fixed: float | None,
) -> list[tuple[Tensor, Tensor]]:
    """[(masked [B, L] bool, t per position [B, L])] for each noisy copy."""
    B, L = x0.shape
    n_blocks = math.ceil(L / block_size)
    blk = torch.arange(L, device=x0.device) // block_size
    if t_fixed is not None:
        t_blk = torch.full((B, n_blocks), float(t_fixed), device=x0.device)
    else:
        t_blk = t_min + (t_max - t_min) * _rand((B, n_blocks), generator, x0.device)
    t_pos = t_blk[:, blk]  # [B, L]
    r = _rand((B, L), generator, x0.device)
    masked = (r < t_pos) & maskable
    copies = [(masked, t_pos)]
    if complementary:
        # every maskable token is a target exactly once; its copy's noise level is 1 - t
        copies.append((maskable & ~masked, (1.0 - t_pos).clamp(min=1e-3)))
    return copies


def _copies_loss(
    model: nn.Module,
    x0: Tensor,
    copies: list[tuple[Tensor, Tensor, Tensor]],
    mask_id: int,
    block_size: int,
    positions: Tensor | None,
) -> tuple[Tensor, int]:
    """One forward over [noisy copies ; x0] (the layout above). Each copy is (masked [B, L] bool:
    input MASK there, targets [B, L] bool: a loss taken there, weight [B, L]). Returns (the
    weighted cross-entropy summed over every copy, per row [B] float32; the number of targets)."""
    B, L = x0.shape
    shift = bool(getattr(model.config, "token_shift", False))
    k = len(copies)
    layout_pos, attn = _layout(L, block_size, k, str(x0.device))
    if positions is not None:
        layout_pos = positions.repeat(1, k + 1)  # [B, (k+1) L]: the same positions in every copy
    ids = torch.cat(
        [torch.where(m, torch.full_like(x0, mask_id), x0) for m, _, _ in copies] + [x0], 1
    )

    # gather only the outputs that carry a loss: per row, a padded list of source indices
    rows_l, cols_l, src_l, w_l = [], [], [], []
    for c, (_, target, w) in enumerate(copies):
        rows, cols = target.nonzero(as_tuple=True)
        rows_l.append(rows)
        cols_l.append(cols)
        src_l.append(source_index(cols, c, k, L, block_size, shift))
        w_l.append(w[rows, cols])
    rows, cols = torch.cat(rows_l), torch.cat(cols_l)
    src, weight = torch.cat(src_l), torch.cat(w_l).float()
    counts = torch.bincount(rows, minlength=B)  # [B] targets per row
    K = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort(rows, stable=True)
    rows, cols, src, weight = rows[order], cols[order], src[order], weight[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=x0.device) - starts[rows]  # rank inside its row
    out_index = torch.zeros(B, K, dtype=torch.long, device=x0.device)
    out_index[rows, slot] = src

    logits, _ = model(ids, positions=layout_pos, attn_mask=attn, out_index=out_index)  # [B, K, V]
    ce = F.cross_entropy(logits[rows, slot].float(), x0[rows, cols], reduction="none")  # [N]
    row_loss = torch.zeros(B, device=ce.device, dtype=torch.float32).index_add(0, rows, ce * weight)
    return row_loss, int(rows.numel())


def block_diffusion_loss(
    model: nn.Module,
    x0: Tensor,
    maskable: Tensor,
    mask_id: int,
    *,
    block_size: int,
    t_min: float = 0.45,
    t_max: float = 0.95,
    complementary: bool = False,
    generator: torch.Generator | None = None,
    t_fixed: float | None = None,
    positions: Tensor | None = None,
    target_weight: Tensor | None = None,
) -> tuple[Tensor, LossStats]:
    """One BD3 training/eval pass. x0 [B, L] clean ids, maskable [B, L] targets; positions [B, L]
    the RoPE position of each slot when rows are reordered (default 0..L-1); target_weight [B, L]
    an extra loss weight per target (training only: the result is then no longer a NELBO).

    Returns (scalar NELBO-per-token estimate, LossStats with per-row sums). `t_fixed` masks every
    block at that level (t_fixed=1: all targets masked, a deterministic loss).
    """
    if block_size < 1 or not 0.0 < t_min <= t_max <= 1.0:
        raise InvalidArgument(
            "need block_size >= 1 and 0 < t_min <= t_max <= 1", field="t_min", value=t_min
        )
    copies = _masked_copies(
        x0, maskable, block_size, t_min, t_max, complementary, generator, t_fixed
    )
    k = len(copies)
    extra = 1.0 if target_weight is None else target_weight
    row_loss, n_targets = _copies_loss(
        model, x0, [(m, m, extra / t_pos) for m, t_pos in copies], mask_id, block_size, positions
    )
    row_loss = row_loss / k  # each copy is one estimate of the same NELBO
    row_tokens = maskable.sum(dim=1)
    loss = row_loss.sum() / row_tokens.sum().clamp(min=1)
    return loss, LossStats(row_loss.detach(), row_tokens, torch.tensor(n_targets))


@torch.no_grad()
def block_nelbo(
    model: nn.Module,
    ids: Tensor,
    maskable: Tensor,
    mask_id: int,
    *,
    block_size: int,
    samples: int = 4,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    n_tokens: Tensor | None = None,
) -> tuple[float, Tensor]:
    """Monte-Carlo NELBO of clean sequences under the block-diffusion model, t_b ~ U(eps, 1]
    per block and sample. Returns (NELBO per token, row NELBO [B] in nats)."""
    row = torch.zeros(ids.shape[0], device=ids.device, dtype=torch.float32)
    for _ in range(samples):
        _, stats = block_diffusion_loss(
            model,
            ids,
            maskable,
            mask_id,
            block_size=block_size,
            t_min=eps,
            t_max=1.0,
            generator=generator,
        )
        row += stats.row_loss
    row = row * (1.0 - eps) / samples
    denom = n_tokens if n_tokens is not None else maskable.sum(dim=1)
    return float(row.sum() / denom.sum().clamp(min=1)), row


@torch.no_grad()
def block_order_nll(
    model: nn.Module,
    ids: Tensor,
    maskable: Tensor,
    mask_id: int,
    *,
    block_size: int,
    positions: Tensor | None = None,
    targets: Tensor | None = None,
) -> tuple[float, Tensor]:
    """Exact NLL of `maskable` tokens when each block is decoded left to right, one token per
    step (the default sampler's order): -sum log p(x_i | earlier blocks, the block's tokens left
    of i). Unlike the NELBO (an average over random unmasking orders, an upper bound), this is the
    likelihood of one decoding process, and no sampling is involved. One forward with
    `block_size` noisy copies: copy j masks the maskable slots at offset >= j of every block and
    takes the loss at offset j. `targets` [B, L] (a subset of maskable) limits the loss to those
    slots, still decoded in that order. Returns (nats per target, row NLL [B] in nats)."""
    offset = torch.arange(ids.shape[1], device=ids.device) % block_size  # [L] slot in its block
    ones = torch.ones_like(ids, dtype=torch.float32)
    targets = maskable if targets is None else targets & maskable
    copies = [(maskable & (offset >= j), targets & (offset == j), ones) for j in range(block_size)]
    row, _ = _copies_loss(model, ids, copies, mask_id, block_size, positions)
    return float(row.sum() / targets.sum().clamp(min=1)), row
