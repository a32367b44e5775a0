"""Training objectives: absorbing-state masked diffusion, and next-token prediction for the baseline.

Forward (noising) process, linear schedule: at time t in (0, 1] every *maskable* token of x0 is
replaced by MASK independently with probability t. The continuous-time negative ELBO (MDLM, LLaDA)
of the maskable tokens given the rest is

    NELBO(x0) = E_{t ~ U(0, 1)} E_{x_t ~ q(.|x0, t)} [ (1/t) * sum_{i masked in x_t} -log p(x0_i | x_t) ]

an upper bound on -log p(x0_maskable | x0_rest). We draw t from [eps, 1): the left-out sliver
[0, eps) contributes about eps * (tokens) * (clean-context CE), negligible for eps = 1e-3.

Normalisation. `diffusion_loss` divides the 1/t-weighted sum by the number of *maskable* tokens of
the batch (fixed before any noise is drawn), not by the number actually masked. Dividing by the
random masked count would re-weight rows and bias the estimate; with a fixed denominator the loss
is an unbiased Monte-Carlo estimate of NELBO per token, directly comparable with the AR baseline's
next-token NLL per token on the same targets.

Every function that draws randomness takes a `torch.Generator` so training is reproducible and
resumable; the generator's device decides where the random numbers are drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmask.errors import InvalidArgument


@dataclass
class LossStats:
    """Per-row sums for evaluation and logging (detached, fp32)."""

    row_loss: Tensor  # [B] NELBO (diffusion) or NLL (AR) summed over the row's targets, in nats
    row_tokens: Tensor  # [B] number of target tokens of each row (maskable / predicted positions)
    n_masked: Tensor  # [] tokens that were masked (diffusion) or predicted (AR) in this batch


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def sample_t(
    batch: int, eps: float = 1e-3, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """Antithetic (stratified) diffusion times: t_i = eps + (1 - eps) * ((u + i/B) mod 1).

    One shared uniform u places exactly one t in each of the B strata of [eps, 1), which lowers the
    variance of the batch loss compared with B independent draws. Returns [B] fp32.
    """
    if batch < 1 or not 0.0 <= eps < 1.0:
        raise InvalidArgument("need batch >= 1 and 0 <= eps < 1", field="eps", value=eps)
    u = _rand((1,), generator, device)
    strata = torch.arange(batch, device=u.device, dtype=torch.float32) / batch
    return eps + (1.0 - eps) * torch.remainder(u + strata, 1.0)


def mask_tokens(
    x0: Tensor,
    t: Tensor,
    maskable: Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Noise x0 [B, T]: each maskable position becomes MASK independently with probability t[row].

    Returns (x_t [B, T], masked [B, T] bool); masked is always a subset of maskable.
    """
    r = _rand(tuple(x0.shape), generator, x0.device)  # [B, T] uniform
    masked = (r < t.to(x0.device)[:, None]) & maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def build_maskable(
    ids: Tensor,
    *,
    prompt_len: Tensor | int = 0,
    target_mask: Tensor | None = None,
    spans: Tensor | None = None,
    keep_ids: Tensor | None = None,
    keep_rows: Tensor | None = None,
) -> Tensor:
    """Which positions the forward process may mask (= the diffusion targets). ids [B, T].

    prompt_len [B] (or int): positions before it are conditioning, never masked (prefix prompt).
    target_mask [B, T]: positions that may be targets at all (e.g. not BOS/tag, not batching pad).
    spans [B, T]: infill rows: only these positions may be masked (all True for other rows).
    keep_ids [V] bool + keep_rows [B] bool: in the selected rows, tokens whose id is in keep_ids
        (MIDI structure: bars, tracks) stay visible, so the model learns bar/track infilling.
    """
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device)[None, :]  # [1, T]
    plen = prompt_len.to(ids.device)[:, None] if isinstance(prompt_len, Tensor) else prompt_len
    maskable = pos >= plen  # [B, T]
    if target_mask is not None:
        maskable = maskable & target_mask
    if spans is not None:
        maskable = maskable & spans
    if keep_ids is not None:
        structural = keep_ids.to(ids.device)[ids]  # [B, T]
        if keep_rows is not None:
            structural = structural & keep_rows.to(ids.device)[:, None]
        maskable = maskable & ~structural
    return maskable


def diffusion_loss(
    logits: Tensor, x0: Tensor, masked: Tensor, t: Tensor, maskable: Tensor
) -> tuple[Tensor, LossStats]:
    """NELBO per token: sum over masked positions of CE / t, divided by the count of maskable ones.

    logits [B, T, V] (any dtype; the CE is computed in fp32), x0 [B, T] clean ids, masked [B, T],
    t [B], maskable [B, T]. Returns (scalar loss, LossStats with per-row NELBO sums).
    """
    B = x0.shape[0]
    rows, cols = masked.nonzero(as_tuple=True)  # only masked positions: [N]
    ce = F.cross_entropy(logits[rows, cols].float(), x0[rows, cols], reduction="none")  # [N]
    weight = 1.0 / t.to(ce.device, torch.float32)[rows]  # the ELBO's 1/t for the linear schedule
    row_loss = torch.zeros(B, device=ce.device, dtype=torch.float32).index_add(0, rows, ce * weight)
    row_tokens = maskable.sum(dim=1)
    loss = row_loss.sum() / row_tokens.sum().clamp(min=1)
    return loss, LossStats(row_loss.detach(), row_tokens, masked.sum())


def ar_loss(logits: Tensor, x: Tensor, loss_mask: Tensor) -> tuple[Tensor, LossStats]:
    """Next-token cross-entropy (fp32): logits[:, i] predicts x[:, i + 1].

    loss_mask [B, T] marks the tokens that are targets (same meaning as `maskable` above: x[b, i]
    counts when loss_mask[b, i]); the loss is the mean NLL over those tokens.
    """
    B = x.shape[0]
    targets = loss_mask[:, 1:]  # [B, T-1]: a target at i+1 is predicted at i
    rows, cols = targets.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows, cols].float(), x[rows, cols + 1], reduction="none")  # [N]
    row_loss = torch.zeros(B, device=ce.device, dtype=torch.float32).index_add(0, rows, ce)
    row_tokens = targets.sum(dim=1)
    loss = row_loss.sum() / row_tokens.sum().clamp(min=1)
    return loss, LossStats(row_loss.detach(), row_tokens, targets.sum())


@torch.no_grad()
def nelbo(
    model: nn.Module,
    ids: Tensor,
    maskable: Tensor,
    mask_id: int,
    *,
    samples: int = 4,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    n_tokens: Tensor | None = None,
) -> tuple[float, Tensor]:
    """Monte-Carlo NELBO of a batch of clean sequences ids [B, T] (targets = maskable [B, T]).

    Each sequence gets `samples` stratified times t_k = eps + (1 - eps) * ((u_b + k/K) mod 1) with
    its own u_b. Returns (NELBO per token, row NELBO [B] in nats). Per token divides by n_tokens [B]
    (default: maskable count); exp of it is an upper bound on perplexity.
    """
    B = ids.shape[0]
    u = _rand((B,), generator, ids.device)
    row = torch.zeros(B, device=ids.device, dtype=torch.float32)
    for k in range(samples):
        t = eps + (1.0 - eps) * torch.remainder(u + k / samples, 1.0)  # [B]
        xt, masked = mask_tokens(ids, t, maskable, mask_id, generator)
        logits, _ = model(xt)
        _, stats = diffusion_loss(logits, ids, masked, t, maskable)
        row += stats.row_loss
    # mean over samples estimates E_{t~U[eps,1)}; times (1 - eps) it is the integral over [eps, 1)
    row = row * (1.0 - eps) / samples
    denom = n_tokens if n_tokens is not None else maskable.sum(dim=1)
    return float(row.sum() / denom.sum().clamp(min=1)), row


@torch.no_grad()
def ar_nll(
    model: nn.Module, ids: Tensor, loss_mask: Tensor, *, n_tokens: Tensor | None = None
) -> tuple[float, Tensor]:
    """Exact NLL of a causal model on ids [B, T]: (NLL per token, row NLL [B] in nats)."""
    logits, _ = model(ids)
    _, stats = ar_loss(logits, ids, loss_mask)
    denom = n_tokens if n_tokens is not None else stats.row_tokens
    return float(stats.row_loss.sum() / denom.sum().clamp(min=1)), stats.row_loss
