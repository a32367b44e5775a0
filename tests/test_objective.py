"""Masked-diffusion maths: times, masking rate, 1/t weighting, normalisation, NELBO, AR loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unmask.models.objective import (
    ar_loss,
    ar_nll,
    build_maskable,
    diffusion_loss,
    mask_tokens,
    nelbo,
    sample_t,
)

V, MASK = 20, 1


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run best on one thread


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_antithetic_t_puts_one_sample_in_each_stratum_of_eps_to_1():
    eps, B = 0.05, 16
    for seed in range(5):
        t = sample_t(B, eps, gen(seed))
        assert t.shape == (B,) and ((t >= eps) & (t < 1.0)).all()
        strata = torch.floor((t - eps) / (1 - eps) * B).long()
        assert sorted(strata.tolist()) == list(range(B))


def test_masking_rate_matches_t_and_spares_unmaskable_positions():
    x0 = torch.randint(2, V, (4, 20000), generator=gen())
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, :100] = False
    xt, masked = mask_tokens(x0, t, maskable, MASK, gen(1))
    rate = masked[:, 100:].float().mean(dim=1)
    torch.testing.assert_close(rate, t, atol=0.015, rtol=0)
    assert not masked[:, :100].any()
    assert (xt[masked] == MASK).all() and torch.equal(xt[~masked], x0[~masked])


def test_diffusion_loss_weights_masked_ce_by_inverse_t_over_maskable_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, V)
    x0 = torch.randint(2, V, (2, 5))
    masked = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    maskable = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)  # 8 tokens
    t = torch.tensor([0.5, 0.25])
    loss, stats = diffusion_loss(logits, x0, masked, t, maskable)
    ce = -torch.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
    row0 = (ce[0, 0] + ce[0, 2]) / 0.5
    row1 = ce[1, 3] / 0.25
    torch.testing.assert_close(stats.row_loss, torch.stack([row0, row1]))
    torch.testing.assert_close(loss, (row0 + row1) / 8)
    assert stats.row_tokens.tolist() == [4, 4] and int(stats.n_masked) == 3


def test_diffusion_loss_is_unbiased_for_a_context_free_model():
    # a model whose CE is log V at every position has NELBO per token exactly log V;
    # dividing by the masked count instead would inflate it by E[1/t]
    B, T = 64, 32
    logits = torch.zeros(B, T, V)
    x0 = torch.randint(0, V, (B, T), generator=gen())
    maskable = torch.ones(B, T, dtype=torch.bool)
    g = gen(3)
    losses = []
    for _ in range(200):
        t = sample_t(B, 1e-3, g)
        _, masked = mask_tokens(x0, t, maskable, MASK, g)
        losses.append(float(diffusion_loss(logits, x0, masked, t, maskable)[0]))
    assert abs(sum(losses) / len(losses) - math.log(V)) < 0.03 * math.log(V)


def test_diffusion_loss_runs_in_fp32_for_bf16_logits():
    logits = torch.randn(2, 4, V).bfloat16().requires_grad_()
    x0 = torch.randint(2, V, (2, 4))
    masked = torch.ones(2, 4, dtype=torch.bool)
    loss, _ = diffusion_loss(logits, x0, masked, torch.tensor([0.5, 1.0]), masked)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_ar_loss_predicts_the_next_token_on_masked_targets_only():
    x = torch.tensor([[2, 3, 4, 5, 6]])
    logits = torch.full((1, 5, V), -30.0)
    logits[0, torch.arange(4), x[0, 1:]] = 30.0  # position i is sure of x[i + 1]
    logits[0, 1, :] = 0.0  # ... except position 1, uniform over V for x[2]
    loss_mask = torch.tensor([[False, False, True, True, True]])
    loss, stats = ar_loss(logits, x, loss_mask)
    assert stats.row_tokens.tolist() == [3]
    torch.testing.assert_close(loss, torch.tensor(math.log(V) / 3), atol=1e-4, rtol=0)
    loss_mask[0, 2] = False  # the uncertain target no longer counts
    assert float(ar_loss(logits, x, loss_mask)[0]) < 1e-4


def test_build_maskable_keeps_prompt_spans_and_structural_tokens_visible():
    ids = torch.tensor([[2, 5, 10, 11, 12, 13, 14, 15], [2, 7, 40, 10, 41, 11, 12, 3]])
    target = torch.ones_like(ids, dtype=torch.bool)
    target[:, :2] = False
    spans = torch.ones_like(target)
    spans[1] = False
    spans[1, 2:6] = True
    structural = torch.zeros(V + 30, dtype=torch.bool)
    structural[40:42] = True
    m = build_maskable(
        ids,
        prompt_len=torch.tensor([4, 2]),
        target_mask=target,
        spans=spans,
        keep_ids=structural,
        keep_rows=torch.tensor([False, True]),
    )
    assert m[0].tolist() == [False] * 4 + [True] * 4  # BOS, tag and a 2-token prompt kept
    assert m[1].tolist() == [False, False, False, True, False, True, False, False]


class Uniform(nn.Module):
    """Predicts every non-MASK token with the same probability, whatever the input."""

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, V)
        logits[..., MASK] = float("-inf")
        return logits, None


def test_nelbo_of_a_uniform_model_is_log_of_the_predictable_vocab():
    ids = torch.randint(2, V, (32, 40), generator=gen())
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :2] = False
    per_token, rows = nelbo(Uniform(), ids, maskable, MASK, samples=8, generator=gen(1))
    assert rows.shape == (32,)
    assert abs(per_token - math.log(V - 1)) < 0.05 * math.log(V - 1)
    exact, _ = ar_nll(Uniform(), ids, maskable)
    assert abs(exact - math.log(V - 1)) < 1e-5
