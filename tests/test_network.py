"""The denoiser network: padding, attention direction, MASK never predicted, KV caches."""

from __future__ import annotations

import pytest
import torch

from unmask.errors import InvalidArgument
from unmask.models.network import Denoiser, KVCache, ModelConfig, Packing

V, MASK = 50, 1


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run best on one thread


def tiny(causal: bool = False, n_layers: int = 2, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        max_seq_len=64,
        causal=causal,
        mask_id=MASK,
    )
    return Denoiser(cfg).eval()


def ids(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, V, shape, generator=g)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_does_not_change_logits_of_real_rows(causal):
    model = tiny(causal)
    short, long = ids(1, 7), ids(1, 12, seed=2)
    alone = model.logits(short)  # [1, 7, V]
    # the short row, right-padded with junk, batched with a longer row
    batch = torch.cat([torch.cat([short, ids(1, 5, seed=3)], dim=1), long])
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[0, 7:] = False
    batched = model.logits(batch, pad)
    torch.testing.assert_close(batched[0, :7], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], model.logits(long)[0], atol=1e-5, rtol=1e-5)
    predictable = torch.arange(V) != MASK
    assert torch.isfinite(batched[0, 7:, predictable]).all(), "padded query rows must stay finite"


def test_padded_batch_runs_position_wise_layers_on_its_real_tokens_only():
    """Rows of different widths (the Engine's jobs) are padded for attention only: the
    projections and the MLP see the real tokens, and every real row's logits and cache are
    those of its unpacked forward."""
    model = tiny(causal=False)
    batch = ids(3, 8)
    pad = torch.ones(3, 8, dtype=torch.bool)
    pad[0, 4:] = False
    pad[2, 5:] = False
    seen: list[int] = []
    hook = model.blocks[0].mlp.register_forward_hook(
        lambda m, args, out: seen.append(
            args[0].shape[0] if args[0].dim() == 2 else args[0].shape[0] * args[0].shape[1]
        )
    )
    logits, cache = model(batch, pad, use_cache=True)
    hook.remove()
    assert seen == [int(pad.sum())]  # 4 + 8 + 5 rows, not 3 x 8
    packed = Packing.of(pad)
    assert packed is not None and Packing.of(torch.ones(2, 3, dtype=torch.bool)) is None
    assert torch.equal(packed.unpack(packed.pack(batch[..., None]))[..., 0], batch * pad)
    for row, width in enumerate((4, 8, 5)):
        alone, own = model(batch[row : row + 1, :width], use_cache=True)
        torch.testing.assert_close(logits[row, :width], alone[0], atol=1e-5, rtol=1e-5)
        for (k, v), (k1, v1) in zip(cache.layers, own.layers, strict=True):
            torch.testing.assert_close(k[row, :, :width], k1[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[row, :, :width], v1[0], atol=1e-5, rtol=1e-5)


def test_bidirectional_model_sees_later_tokens_and_causal_model_does_not():
    x = ids(1, 10)
    y = x.clone()
    y[0, 8] = (x[0, 8] + 1 - 2) % (V - 2) + 2  # change one late token
    bi, ar = tiny(causal=False), tiny(causal=True)
    assert not torch.allclose(bi.logits(x)[0, :8], bi.logits(y)[0, :8])
    torch.testing.assert_close(ar.logits(x)[0, :8], ar.logits(y)[0, :8])


@pytest.mark.parametrize("causal", [False, True])
def test_mask_token_is_never_predicted(causal):
    logits = tiny(causal).logits(ids(3, 9))
    assert torch.isneginf(logits[..., MASK]).all()
    assert (
        torch.isfinite(logits[..., :MASK]).all() and torch.isfinite(logits[..., MASK + 1 :]).all()
    )


def test_ar_kv_cache_decoding_matches_full_forward():
    model = tiny(causal=True)
    x = ids(2, 11)
    full = model.logits(x)
    logits, cache = model(x[:, :5], use_cache=True)  # prompt
    steps = [logits]
    for i in range(5, 11):  # then one token at a time
        logits, cache = model(x[:, i : i + 1], start_pos=i, past=cache, use_cache=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 11 and cache.batch_size == 2


def test_ar_cache_with_per_row_start_pos_serves_prompts_of_different_lengths():
    model = tiny(causal=True)
    a, b = ids(1, 4), ids(1, 6, seed=2)
    prompts = torch.cat([torch.cat([a, torch.zeros(1, 2, dtype=torch.long)], dim=1), b])
    pad = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    _, cache = model(prompts, pad, use_cache=True)
    nxt = ids(2, 1, seed=5)
    logits, _ = model(nxt, start_pos=torch.tensor([4, 6]), past=cache)
    ref_a = model.logits(torch.cat([a, nxt[:1]], dim=1))[0, -1]
    ref_b = model.logits(torch.cat([b, nxt[1:]], dim=1))[0, -1]
    torch.testing.assert_close(logits[0, 0], ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, 0], ref_b, atol=1e-5, rtol=1e-5)


def test_bidirectional_prefix_cache_is_exact_for_one_layer():
    # one layer: keys/values of the prefix depend only on the prefix tokens themselves, so a
    # prefix-cached forward of the rest must equal the rest of a single full forward
    model = tiny(n_layers=1)
    x = ids(2, 12)
    _, cache = model(x[:, :5], use_cache=True)
    rest, _ = model(x[:, 5:], start_pos=5, past=cache)
    torch.testing.assert_close(rest, model.logits(x)[:, 5:], atol=1e-5, rtol=1e-5)


def test_bidirectional_prefix_cache_equals_full_forward_with_prefix_attending_to_itself(
    monkeypatch,
):
    model = tiny(n_layers=3)
    x, P, T = ids(2, 12), 5, 12
    _, cache = model(x[:, :P], use_cache=True)
    rest, _ = model(x[:, P:], start_pos=P, past=cache)
    # reference: one full forward in which prefix queries see only the prefix
    allowed = torch.ones(T, T, dtype=torch.bool)
    allowed[:P, P:] = False
    monkeypatch.setattr(model, "_attention_mask", lambda *a: (allowed[None, None], False))
    torch.testing.assert_close(rest, model.logits(x)[:, P:], atol=1e-5, rtol=1e-5)


def test_prefix_cache_with_padded_prefixes_matches_each_row_alone():
    model = tiny()
    a, b = ids(1, 3), ids(1, 6, seed=2)
    prefix = torch.cat([torch.cat([a, torch.zeros(1, 3, dtype=torch.long)], dim=1), b])
    pad = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    _, cache = model(prefix, pad, use_cache=True)
    block = torch.full((2, 4), MASK)
    out, _ = model(block, start_pos=torch.tensor([3, 6]), past=cache)
    for row, p in ((0, a), (1, b)):
        _, c = model(p, use_cache=True)
        ref, _ = model(block[:1], start_pos=p.shape[1], past=c)
        torch.testing.assert_close(out[row], ref[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_select_and_truncate_keep_rows_and_positions():
    model = tiny()
    _, cache = model(ids(3, 8), use_cache=True)
    picked = cache.select([2, 0])
    assert picked.batch_size == 2 and torch.equal(picked.layers[0][0][0], cache.layers[0][0][2])
    short = cache.truncate(5)
    assert short.length == 5 and short.layers[1][1].shape[2] == 5
    with pytest.raises(InvalidArgument):
        cache.truncate(9)
    assert isinstance(short, KVCache)


def test_positions_beyond_max_seq_len_are_rejected():
    model = tiny()
    with pytest.raises(InvalidArgument):
        model(ids(1, 10), start_pos=60)
    with pytest.raises(InvalidArgument):
        model(ids(2, 10), start_pos=torch.tensor([0, 55]))


def test_config_round_trips_and_validates():
    cfg = ModelConfig(vocab_size=V, d_model=64, mask_id=MASK)
    assert cfg.mlp_hidden == 192  # 8/3 * 64 rounded up to a multiple of 64
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InvalidArgument):
        ModelConfig(vocab_size=V, d_model=30, n_heads=4)
    with pytest.raises(InvalidArgument):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_tied_embeddings_are_counted_once():
    model = tiny()
    assert model.head.weight is model.tok_emb.weight
    n = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == n
    assert model.num_parameters(exclude_embeddings=True) == n - V * 32
    assert "parameters" in model.describe()
