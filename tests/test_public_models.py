"""Public checkpoints (LLaDA, Dream / Fast-dLLM v2, SDAR) on our network match `transformers`.

Each family's tiny random checkpoint (tests/public_fixtures.py: real config keys and tensor names,
two shards + index, a trained tokenizer.json) is loaded through its adapter, and the same weights
through LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM given the family's attention as a
float 4D mask. fp32 logits agree to 1e-5; a whole greedy Engine job writes exactly the tokens of a
plain loop over the transformers model (shift and block rules included).
"""

from __future__ import annotations

import pytest
import torch
from public_fixtures import (
    FAMILIES,
    block_causal,
    reference_logits,
    reference_model,
    write_checkpoint,
)

from unmask.engine.engine import Engine
from unmask.engine.request import GenerationRequest
from unmask.errors import InvalidArgument
from unmask.models.families.generator import PublicGenerator
from unmask.models.hf_checkpoint import load_hf
from unmask.models.network import KVCache
from unmask.models.sampler import StepInputs, collate_inputs, run_batch, split_outputs
from unmask.models.sampler_params import SamplerParams

ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    d = write_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    model, tok, meta = load_hf(d, dtype="float32")
    return request.param, d, model, tok, meta, reference_model(d)


def _allowed(model, T: int, B: int = 1) -> torch.Tensor:
    c = model.config
    if c.attention == "block_causal":
        return block_causal(T, c.block_size)[None].expand(B, T, T)
    return torch.ones(B, T, T, dtype=torch.bool)


def _ref(ref, model, meta, ids, allowed, positions=None):
    """The reference logits as our network reports them (network-level shift, MASK banned)."""
    B, T = ids.shape
    pos = positions if positions is not None else torch.arange(T)[None].expand(B, T)
    out = reference_logits(ref, ids, allowed, pos)
    if model.config.output_shift:
        out = torch.cat([out[:, :1], out[:, :-1]], dim=1)
    out[..., meta["mask_id"]] = float("-inf")
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    assert (a[fin] - b[fin]).abs().max().item() < ATOL


def _ids(B: int, T: int, seed: int, mask_id: int, V: int = 250) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[:, T // 2 :: 3] = mask_id  # some MASK tokens on the canvas, as while sampling
    return ids


def test_full_forward_matches_transformers(family):
    _, _, model, _, meta, ref = family
    ids = _ids(3, 16, 1, meta["mask_id"])
    with torch.no_grad():
        ours = model(ids)[0]
    _close(ours, _ref(ref, model, meta, ids, _allowed(model, 16, 3)))


def test_padded_batch_rows_match_single_rows(family):
    _, _, model, _, meta, ref = family
    lengths = [16, 9, 12]
    ids = _ids(3, 16, 2, meta["mask_id"])
    pad = torch.arange(16)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        batched = model(ids, pad)[0]
        for row, n in enumerate(lengths):
            single = model(ids[row : row + 1, :n])[0][0]
            _close(batched[row, :n], single)
            want = _ref(ref, model, meta, ids[row : row + 1, :n], _allowed(model, n))[0]
            _close(batched[row, :n], want)


def test_prefix_cache_windows_with_per_row_offsets(family):
    """Rows with different cached prefixes (collated as the Engine does) and windows at their
    own offsets: the logits of the reference under the cache's attention pattern (the prefix saw
    only itself; the window sees the prefix and itself — block-causally where the model is)."""
    _, _, model, _, meta, ref = family
    if model.config.output_shift:
        with pytest.raises(InvalidArgument) as err:
            past = model(torch.zeros(1, 4, dtype=torch.long), use_cache=True)[1]
            model(torch.zeros(1, 4, dtype=torch.long), start_pos=4, past=past)
        assert err.value.field == "use_cache"
        return
    T = 16
    ids = _ids(2, T, 3, meta["mask_id"])
    prefixes = [8, 4]  # whole blocks (block size 4 in the fixtures)
    inputs = []
    with torch.no_grad():
        for row, P in enumerate(prefixes):
            _, cache = model(ids[row : row + 1, :P], use_cache=True)
            inputs.append(StepInputs(ids[row : row + 1, P:], P, cache, use_cache=False))
        batch = collate_inputs(inputs, pad_id=meta["pad_id"])
        logits, _ = run_batch(model, batch)
        outs = split_outputs(batch, logits, None)
    for row, P in enumerate(prefixes):
        allowed = _allowed(model, T).clone()
        allowed[:, :P, P:] = False  # the cached prefix never saw the window
        want = _ref(ref, model, meta, ids[row : row + 1], allowed)[0, P:]
        _close(outs[row][0], want)


def test_kv_cache_holds_only_kv_heads(family):
    name, _, model, _, _, _ = family
    with torch.no_grad():
        _, cache = model(torch.zeros(1, 5, dtype=torch.long), use_cache=True)
    assert isinstance(cache, KVCache)
    k, v = cache.layers[0]
    assert k.shape == (1, model.config.n_kv_heads, 5, model.config.head_dim) == v.shape
    if name != "llada":
        assert model.config.n_kv_heads < model.config.n_heads


# ---- a whole Engine job against a plain reference loop ------------------------------------------


def reference_greedy(ref, model, meta, prompt: list[int], gen: int, block_length: int) -> list[int]:
    """Greedy masked-diffusion decoding over the transformers model, one token per step, written
    from the families' rules: full attention -> the whole canvas each step, blocks of
    `block_length` over the generated span; block-causal -> the canvas up to the end of the
    current block of the model's grid, block-causal mask; shift -> position i reads output i - 1.
    MASK and the padding id are never written (unmask's sampler rule)."""
    c = model.config
    mask_id, pad_id = meta["mask_id"], meta["pad_id"]
    canvas = torch.tensor(prompt + [mask_id] * gen)
    P, T = len(prompt), len(prompt) + gen
    if c.attention == "block_causal":
        blocks, lo = [], P
        while lo < T:
            hi = min((lo // c.block_size + 1) * c.block_size, T)
            blocks.append((lo, hi))
            lo = hi
    else:
        blocks = [(lo, min(lo + block_length, T)) for lo in range(P, T, block_length)]
    for lo, hi in blocks:
        while bool((canvas[lo:hi] == mask_id).any()):
            end = hi if c.attention == "block_causal" else T
            x = canvas[None, :end]
            allowed = _allowed(model, end)
            out = reference_logits(ref, x, allowed, torch.arange(end)[None])[0]
            if c.output_shift or c.token_shift:  # prediction for i = output at i - 1
                out = torch.cat([out[:1], out[:-1]], dim=0)
            out[:, [mask_id, pad_id]] = float("-inf")
            open_pos = lo + (canvas[lo:hi] == mask_id).nonzero().flatten()
            probs = out[open_pos].softmax(-1)
            conf, tok = probs.max(-1)
            best = int(conf.argmax())
            canvas[open_pos[best]] = tok[best]
    return canvas[P:].tolist()


@pytest.mark.parametrize("gen", [8])
def test_engine_greedy_job_equals_reference_loop(family, gen):
    name, _, model, tok, meta, ref = family
    generator = PublicGenerator(model, tok, meta)
    prompt = "def add(a, b):"
    params = SamplerParams(
        gen_length=gen, steps=gen, block_length=4 if model.config.attention == "full" else None,
        temperature=0.0, stop_at_eos=False, use_cache="none",
    )  # fmt: skip
    requests = [
        GenerationRequest(modality="code", prompt=prompt, params=params, return_tokens=True),
        GenerationRequest(modality="text", prompt="rain falls", params=params, return_tokens=True),
    ]
    with Engine(generator, max_batch=4) as engine:  # both jobs step together (batched)
        handles = [engine.submit(r) for r in requests]
        results = [h.result(timeout=60) for h in handles]
    for request, result in zip(requests, results, strict=True):
        assert result.status == "succeeded", result.error
        got = [t[1] for t in sorted(result.tokens)]
        prompt_ids = generator.prompt_ids(request.modality, request.prompt)
        want = reference_greedy(ref, model, meta, prompt_ids, gen, 4)
        assert got == want, name
        assert result.output_text == request.prompt + tok.decode(want)


def test_engine_prefix_cache_is_exact_for_block_causal(family):
    """Block-causal families: the exact prefix cache gives the tokens of the cache-free run."""
    _, _, model, tok, meta, _ = family
    if model.config.attention != "block_causal":
        pytest.skip("full attention: the caches are approximations")
    generator = PublicGenerator(model, tok, meta)
    outs = []
    for mode in ("none", "prefix"):
        params = SamplerParams(gen_length=12, steps=6, temperature=0.0, stop_at_eos=False,
                               use_cache=mode)  # fmt: skip
        outs.append(generator.generate("text", "the quick brown", params).generated_ids)
    assert outs[0] == outs[1]


def test_engine_block_events_decode_with_the_checkpoints_tokenizer(family):
    _, _, model, tok, meta, _ = family
    generator = PublicGenerator(model, tok, meta)
    params = SamplerParams(gen_length=8, steps=8, block_length=4, temperature=0.0,
                           stop_at_eos=False)  # fmt: skip
    if model.config.attention == "block_causal":
        params = SamplerParams(gen_length=8, steps=8, temperature=0.0, stop_at_eos=False)
    with Engine(generator) as engine:
        handle = engine.submit(GenerationRequest(modality="text", prompt="rain", params=params))
        events = list(handle.events(timeout=60))
    blocks = [e for e in events if e["type"] == "block"]
    assert blocks and all(e["text"] == tok.decode(e["ids"]) for e in blocks)
    assert all(i not in tok.special_ids for e in blocks for i in e["ids"])
    assert sum(len(e["ids"]) for e in blocks) >= 1


def test_loading_streams_one_tensor_group_at_a_time(tmp_path, monkeypatch):
    """No second full copy: tensors read from the shards (fp32 here, cast to bf16 on load) are
    dropped before the next group is read, so at most one fused group (q/k/v) is alive."""
    import weakref

    from unmask.models import hf_checkpoint

    d = write_checkpoint(tmp_path / "llada", "llada")
    live, peak, largest = [0], [0], [0]
    real_open = hf_checkpoint.safe_open

    class Tracked:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.fh = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_slice(self, name):
            return self.fh.get_slice(name)

        def get_tensor(self, name):
            t = self.fh.get_tensor(name)
            n = t.numel() * t.element_size()
            live[0] += n
            peak[0], largest[0] = max(peak[0], live[0]), max(largest[0], n)
            weakref.finalize(t, lambda: live.__setitem__(0, live[0] - n))
            return t

    monkeypatch.setattr(hf_checkpoint, "safe_open", Tracked)
    model, _, _ = load_hf(d, dtype="bfloat16")
    total = sum(p.numel() * 4 for p in model.parameters())
    assert next(model.parameters()).dtype == torch.bfloat16
    assert live[0] == 0 and peak[0] <= 3 * largest[0] and peak[0] < total / 2


def test_a_single_safetensors_file_loads_like_the_shards(family, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, d, model, _, meta, _ = family
    one = tmp_path / "single"
    shutil.copytree(d, one)
    state = {}
    for shard in sorted(one.glob("model-*.safetensors")):
        state.update(load_file(str(shard)))
        shard.unlink()
    (one / "model.safetensors.index.json").unlink()
    save_file(state, str(one / "model.safetensors"))
    single, _, meta2 = load_hf(one, dtype="float32")
    ids = _ids(1, 8, 4, meta["mask_id"])
    with torch.no_grad():
        assert torch.equal(single(ids)[0], model(ids)[0])
    assert meta2["content_hash"] != meta["content_hash"]  # another layout, another hash
