"""Masked-diffusion decoding (MDLM / LLaDA / Fast-dLLM style) and the autoregressive baseline.

One denoising step is a pipeline of small functions, each testable alone:

    step_logits -> apply_constraints -> apply_pinned -> sample_tokens -> score_positions
                -> select_commits -> remask

`SamplerState` holds one job's canvas between steps and splits a step into `prepare_inputs()`
(what to feed the model) and `advance(logits)` (everything after the forward), so an engine can
run one batched forward for many jobs (`collate_inputs` -> `run_batch` -> `split_outputs`).
`advance` is itself `propose` (constraints, per job) -> `sample_draws` (token sampling, which an
engine runs once for all its jobs) -> `finish_step` (commit, remask, the step's event).
`generate` is the single-job loop over that state. The AR baseline's decoding is in
models/ar_decoding.py, the constraints in models/constraints.py.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from unmask.errors import InvalidArgument
from unmask.models.canvas import Canvas, CanvasLayout, Masked
from unmask.models.constraints import (
    ConstraintTables,
    SamplerVocab,
    apply_constraints,
    apply_pinned,
    has_grammar_spans,
    pin_masks,
)
from unmask.models.network import KVCache
from unmask.models.sampler_params import SamplerParams

FINISH_REASONS = ("length", "eos", "max_steps")

# ---------------------------------------------------------------------------------------------
# Step pipeline
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StepInputs:
    """What to feed the model for one job this step: `model(ids, start_pos=, past=, use_cache=)`."""

    ids: Tensor  # LongTensor [1, W]: the window of the canvas to run
    start_pos: int  # canvas position of ids[0, 0]
    past: KVCache | None  # cached K/V the window attends to (None = full forward)
    use_cache: bool  # return the window's K/V too (first step of a block in a cache mode)
    out_offset: int = 0  # logits are needed for window offsets [out_offset, out_offset + out_len)
    out_len: int | None = None  # None = the whole window
    positions: Tensor | None = None  # LongTensor [1, W]: RoPE positions of a reordered canvas
    out_positions: Tensor | None = None  # LongTensor [K]: explicit window offsets (replaces
    # out_offset/out_len): the vocabulary head runs on the positions still masked only

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    @property
    def n_out(self) -> int:
        if self.out_positions is not None:
            return int(self.out_positions.numel())
        return self.width - self.out_offset if self.out_len is None else self.out_len

    def out_index(self) -> Tensor:
        if self.out_positions is not None:
            return self.out_positions
        return torch.arange(self.out_offset, self.out_offset + self.n_out, device=self.ids.device)


def step_logits(model: torch.nn.Module, inputs: StepInputs) -> tuple[Tensor, KVCache | None]:
    """One forward pass over the job's window -> (logits [W, V], cache or None)."""
    extra = {"positions": inputs.positions} if inputs.positions is not None else {}
    logits, cache = model(
        inputs.ids,
        start_pos=inputs.start_pos,
        past=inputs.past,
        use_cache=inputs.use_cache,
        out_index=inputs.out_index()[None],
        **extra,
    )
    return logits[0], cache


@dataclass(frozen=True, eq=False)
class BatchInputs:
    """Several jobs' StepInputs as one forward: `model(ids, pad_mask, start_pos=, past=, ...)`."""

    ids: Tensor  # [B, W] right-padded with pad_id
    pad_mask: Tensor  # [B, W] True = real token
    start_pos: Tensor  # [B]
    past: KVCache | None  # [B, P] right-padded caches (all-padding rows for jobs without one)
    use_cache: bool
    widths: tuple[int, ...]
    wants_cache: tuple[bool, ...]
    out_index: Tensor | None = None  # [B, K] window offsets whose logits each job needs
    n_out: tuple[int, ...] = ()
    positions: Tensor | None = None  # [B, W] RoPE positions (when a job's canvas is reordered)


def collate_inputs(
    inputs: Sequence[StepInputs], pad_id: int, caches: CacheCollator | None = None
) -> BatchInputs:
    """Stack jobs' windows (and caches) into one batch. Padded keys are never attended and RoPE
    is in the cached keys, so each row's logits are those of its own unbatched forward.
    `caches` (one per engine) reuses the batched past of the previous step where it can."""
    B, W = len(inputs), max(i.width for i in inputs)
    first = inputs[0].ids
    ids = torch.full((B, W), pad_id, dtype=torch.long, device=first.device)
    pad_mask = torch.zeros(B, W, dtype=torch.bool, device=first.device)
    for row, i in enumerate(inputs):
        ids[row, : i.width] = i.ids[0]
        pad_mask[row, : i.width] = True
    start_pos = torch.tensor([i.start_pos for i in inputs], dtype=torch.long, device=first.device)
    K = max(i.n_out for i in inputs)
    out_index = torch.zeros(B, K, dtype=torch.long, device=first.device)
    for row, i in enumerate(inputs):
        out_index[row, : i.n_out] = i.out_index()
    positions = None
    if any(i.positions is not None for i in inputs):  # RoPE positions for every row then
        positions = torch.zeros(B, W, dtype=torch.long, device=first.device)
        for row, i in enumerate(inputs):
            own = (
                i.positions[0]
                if i.positions is not None
                else i.start_pos + torch.arange(i.width, device=first.device)
            )
            positions[row, : i.width] = own
    return BatchInputs(
        ids,
        pad_mask,
        start_pos,
        (caches or _collate_caches)([i.past for i in inputs]),
        any(i.use_cache for i in inputs),
        tuple(i.width for i in inputs),
        tuple(i.use_cache for i in inputs),
        out_index,
        tuple(i.n_out for i in inputs),
        positions,
    )


def _collate_caches(
    pasts: Sequence[KVCache | None], room: int = 0, grow: int = 0
) -> KVCache | None:
    """The jobs' caches as one right-padded batch. `room` > 0: in buffers with that many free
    positions after the end (`KVCache.room`); `grow`: that many padding positions more, into
    which a job's cache can grow in place (`CacheCollator`)."""
    present = [p for p in pasts if p is not None]
    if not present:
        return None
    if len(present) == len(pasts) == 1:  # one job: its own cache, no copy
        return present[0]
    P = max(p.length for p in present)
    ref = present[0]
    if not room and not grow and len(present) == len(pasts) and all(p.length == P for p in present):
        layers = [  # no padding needed
            (
                torch.cat([p.layers[li][0] for p in pasts]),
                torch.cat([p.layers[li][1] for p in pasts]),
            )
            for li in range(len(ref.layers))
        ]
        return KVCache(layers, torch.cat([p.pad_mask for p in pasts]))
    P += grow
    pad = torch.zeros(len(pasts), P, dtype=torch.bool, device=ref.pad_mask.device)
    layers = []
    for li, (k_ref, v_ref) in enumerate(ref.layers):
        k = k_ref.new_zeros(len(pasts), k_ref.shape[1], P + room, k_ref.shape[3])
        v = v_ref.new_zeros(len(pasts), v_ref.shape[1], P + room, v_ref.shape[3])
        for row, p in enumerate(pasts):
            if p is not None:
                k[row, :, : p.length] = p.layers[li][0][0]
                v[row, :, : p.length] = p.layers[li][1][0]
        layers.append((k[:, :, :P], v[:, :, :P]))
    for row, p in enumerate(pasts):
        if p is not None:
            pad[row, : p.length] = p.pad_mask[0]
    return KVCache(layers, pad, room)


# The Engine's batched past (CacheCollator) keeps free positions after its end, where each
# forward writes its window's keys and values (`network.append_positions`): a window of 4-8
# slots, an AR token; a wider one (a newly admitted job's prompt) is copied as before...
KV_ROOM = 16
# ...and padding positions before those, into which a job's cache grows by a block (or an AR
# job's by 8 tokens) in place, instead of a rebuild of the whole batch whenever the longest
# job finishes a block
KV_GROW = 8


class CacheCollator:
    """The batched past of the last step, kept for the next one. A diffusion job's cache only
    changes when it finishes a block (every few steps), so most steps find every row's cache
    unchanged and skip the copy (for 32 jobs: megabytes per step); rows whose cache changed are
    rewritten in place when the batch keeps its rows and room; anything else rebuilds it."""

    def __init__(self) -> None:
        self._pasts: list[KVCache | None] = []  # the caches the batched past was built from
        self._batched: KVCache | None = None
        self._owned = False  # the batched tensors are ours (not a lone job's own cache)

    def __call__(self, pasts: Sequence[KVCache | None]) -> KVCache | None:
        old, batched = self._pasts, self._batched
        same_rows = len(old) == len(pasts) and batched is not None
        if same_rows and all(a is b for a, b in zip(old, pasts, strict=True)):
            return batched
        changed = [i for i, (a, b) in enumerate(zip(old, pasts, strict=False)) if a is not b]
        if (
            same_rows
            and self._owned
            and all(pasts[i] is not None and pasts[i].length <= batched.length for i in changed)
            and len(changed) < len(pasts)
        ):
            assert batched is not None
            for i in changed:
                p = pasts[i]
                assert p is not None
                for (k, v), (pk, pv) in zip(batched.layers, p.layers, strict=True):
                    k[i, :, : p.length] = pk[0]
                    v[i, :, : p.length] = pv[0]
                batched.pad_mask[i] = False
                batched.pad_mask[i, : p.length] = p.pad_mask[0]
            self._pasts = list(pasts)
            return batched
        batched = _collate_caches(pasts, KV_ROOM, KV_GROW)
        self._pasts, self._batched = list(pasts), batched
        self._owned = batched is not None and not any(batched is p for p in pasts)
        if (
            batched is not None
            and self._owned
            and any(
                p is not None and batched.layers[0][0].data_ptr() == p.layers[0][0].data_ptr()
                for p in pasts
            )
        ):
            self._owned = False  # shares storage with a job's cache: never write into it
        return batched


def run_batch(model: torch.nn.Module, batch: BatchInputs) -> tuple[Tensor, KVCache | None]:
    """One forward pass for a collated batch."""
    extra = {"positions": batch.positions} if batch.positions is not None else {}
    return model(
        batch.ids,
        batch.pad_mask,
        start_pos=batch.start_pos,
        past=batch.past,
        use_cache=batch.use_cache,
        out_index=batch.out_index,
        **extra,
    )


def split_outputs(
    batch: BatchInputs, logits: Tensor, cache: KVCache | None
) -> list[tuple[Tensor, KVCache | None]]:
    """Per job: (logits [W_i, V], that job's KVCache of its own window when it asked for one)."""
    past_len = batch.past.length if batch.past is not None else 0
    # the batched past's buffer is overwritten by the next forward: keep copies of it
    shared = batch.past is not None and batch.past.room > 0
    out: list[tuple[Tensor, KVCache | None]] = []
    for row, (width, wants) in enumerate(zip(batch.widths, batch.wants_cache, strict=True)):
        row_cache = None
        if wants and cache is not None:
            # the row's own cache: its real past slots (if it had a past), then its window,
            # which sits after the batch's (padded) past slots
            keep = torch.arange(past_len, past_len + width, device=cache.pad_mask.device)
            if batch.past is not None:
                own = batch.past.pad_mask[row].nonzero().flatten().to(keep.device)
                keep = torch.cat([own, keep])
            # the row as a view, then one copy of the positions it keeps
            row_cache = kv_keep(cache.select(slice(row, row + 1)), keep, copy=shared)
        n = batch.n_out[row] if batch.n_out else width
        out.append((logits[row, :n], row_cache))
    return out


def filter_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Keep the top_k logits of each row (0 = keep all)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


TOP_P_BUCKETS = 256  # filter_top_p: log-probability buckets, TOP_P_BUCKET_NATS wide each
TOP_P_BUCKET_NATS = 0.125


def filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely ids whose probability reaches top_p (1.0 = all):
    the same ids as sorting each row (`filter_top_p_sorted`), by `top_p_keep`."""
    if top_p >= 1.0 or logits.shape[0] == 0:
        return logits
    _, keep = top_p_keep(logits, top_p)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_keep(logits: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """(softmax of the logits [N, V], bool [N, V]: the ids of each row's nucleus).

    Without sorting the vocabulary: a small model's nucleus holds thousands of ids, and a
    stable sort of every row of every job was the largest cost of a denoising step after the
    forward pass. The ids are bucketed by log-probability below the row's best
    (`TOP_P_BUCKET_NATS` wide); the mass of each bucket says which buckets lie wholly inside the
    nucleus or wholly outside; only the ids of the bucket the cut falls into are sorted, those
    of every row in one sort (ties: the lower id first, as a stable sort of the row has them)."""
    N, V = logits.shape
    probs = logits.softmax(dim=-1)
    top = logits.max(dim=-1, keepdim=True).values
    # below the best, in buckets; -inf logits (banned ids) land in the last bucket
    bucket = (top - logits).mul_(1 / TOP_P_BUCKET_NATS).nan_to_num_(posinf=TOP_P_BUCKETS)
    bucket = bucket.clamp_(0, TOP_P_BUCKETS - 1).long()  # truncation = floor here: 0 = best
    mass = probs.new_zeros(N, TOP_P_BUCKETS).scatter_add_(1, bucket, probs)  # [N, buckets]
    before = mass.cumsum(dim=-1) - mass  # probability of every more likely bucket
    # the cut falls in the last bucket that starts below top_p
    cut = (before < top_p).sum(dim=-1, keepdim=True) - 1  # [N, 1]
    keep = bucket < cut
    # the cut's bucket, every row at once: most likely first within each row, kept while the
    # mass before them is below top_p
    r, c = (bucket == cut).nonzero(as_tuple=True)  # by row, then id
    p = probs[r, c].double()
    order = torch.sort(p, descending=True, stable=True).indices
    order = order[torch.sort(r[order], stable=True).indices]  # rows together again
    r, c, p = r[order], c[order], p[order]
    # each row's ids side by side ([N, most in a cut]) for a cumulative sum per row
    counts = torch.bincount(r, minlength=N)
    rank = torch.arange(r.numel(), device=r.device) - (counts.cumsum(dim=0) - counts)[r]
    side = p.new_zeros(N, int(counts.max()) if r.numel() else 0).index_put_((r, rank), p)
    ahead = (side.cumsum(dim=-1) - side)[r, rank]  # mass of the row's cut ids before each
    inside = before.gather(-1, cut)[r, 0] + ahead < top_p
    keep[r[inside], c[inside]] = True
    return probs, keep


def filter_top_p_sorted(logits: Tensor, top_p: float) -> Tensor:
    """`filter_top_p` by a stable sort of each row (the reference it is tested against)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop an id when the ids before it already reach top_p; the top id is always kept
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filtered_probs(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """What a draw at temperature > 0 picks from: the tempered softmax of logits [N, V] with the
    top-k and nucleus filters applied (filtered ids 0; the nucleus rows are not renormalised)."""
    z = filter_top_k(logits.float() / temperature, top_k)
    if top_p >= 1.0:
        return z.softmax(dim=-1)
    probs, keep = top_p_keep(z, top_p)
    return probs.masked_fill_(~keep, 0.0)


def sample_with_noise(
    logits: Tensor, temperature: float, top_k: int, top_p: float, uniforms: Tensor
) -> Tensor:
    """One id per row of logits [N, V] at temperature > 0: the exponential race, argmax of
    p_i / E_i with E_i = -log u_i ~ Exp(1), picks id i with probability p_i (the tempered,
    filtered distribution), as Gumbel-max does, with one log per id instead of two and in
    float32. uniforms [N, V] float32 in [0, 1), one per id. Each id competes only with its own
    noise, so logits that differ in their last bits (bf16, batched or not) rarely change the
    pick; an inverse-CDF draw (one uniform per row) would move with the sum of those bits."""
    probs = filtered_probs(logits, temperature, top_k, top_p)  # filtered ids: 0 / E never wins
    tiny = torch.finfo(torch.float32).tiny  # u = 0 would make E infinite
    exp = uniforms.to(probs.device).clamp(min=tiny).log_().neg_()  # the caller's stay as given
    return (probs / exp).argmax(dim=-1)


def noise_for(rows: int, vocab_size: int, generator: torch.Generator) -> Tensor:
    """The uniforms of `rows` rows [rows, V] for `sample_with_noise`, drawn on the CPU from the
    job's own generator, so a seed gives the same ids anywhere."""
    return torch.rand(rows, vocab_size, generator=generator)


def sample_tokens(
    logits: Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One id per row of logits [N, V]: argmax at temperature 0, else `sample_with_noise`."""
    if logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    if temperature == 0:
        return logits.argmax(dim=-1)
    if generator is None:
        raise InvalidArgument("sampling at temperature > 0 needs a generator", field="seed")
    u = noise_for(logits.shape[0], logits.shape[1], generator)
    return sample_with_noise(logits, temperature, top_k, top_p, u)


def score_positions(logits: Tensor, tokens: Tensor, method: str = "probability") -> Tensor:
    """Confidence in [0, 1] per row of constrained logits [N, V] (temperature-free, so a threshold
    means the same at any temperature): probability of the chosen token, top1-top2 probability
    margin, or exp(-entropy)."""
    probs = logits.float().softmax(dim=-1)
    if method == "probability":
        return probs.gather(-1, tokens[:, None]).squeeze(-1)
    if method == "margin":
        if probs.shape[-1] < 2:
            return torch.ones(probs.shape[0], device=probs.device)
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if method == "entropy":
        entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
        return torch.exp(-entropy)
    raise InvalidArgument(f"unknown position score {method!r}", field="position_score")


@dataclass(frozen=True, eq=False)
class Draw:
    """One job's sampling for one step: logits rows [N, V], its knobs, its own seeded generator
    (so a job's tokens never depend on the jobs batched with it), and the position score to
    report. The rows are constrained already, or (`allowed`) raw rows whose allowed ids are
    `allowed[allowed_rows]`, a shared table's rows: `sample_draws` then masks the rows of every
    job with the same table in one op instead of one per job."""

    logits: Tensor
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    score: str = "probability"
    allowed: Tensor | None = None  # bool [R, V] (ConstraintTables.allowed)
    allowed_rows: Tensor | None = None  # long [N]: each row's row of `allowed`
    # rows to argmax after the sampled ones (temperature 0, probability score): the guesses a
    # step event shows for the positions a step leaves open, batched with every job's guesses;
    # their tokens and confidences follow the draw's own in `sample_draws`' result
    guess: Draw | None = None


def sample_draws(draws: Sequence[Draw]) -> list[tuple[Tensor, Tensor]]:
    """(tokens [N_i], confidence [N_i]) per draw; the same as `sample_tokens` and
    `score_positions` draw by draw (a draw's `guess` rows appended). Draws with the same knobs
    are filtered and scored as one tensor (the per-call cost of a dozen small ops, paid once per
    step, not once per job); each draw's noise still comes from its own generator."""
    guesses = [d.guess for d in draws if d.guess is not None]
    if not guesses:
        return _sample_groups(draws)
    out = _sample_groups([*draws, *guesses])
    guessed = iter(out[len(draws) :])
    result = []
    for d, (tokens, conf) in zip(draws, out, strict=False):
        if d.guess is not None:
            g_tokens, g_conf = next(guessed)
            tokens, conf = torch.cat([tokens, g_tokens]), torch.cat([conf, g_conf])
        result.append((tokens, conf))
    return result


def _sample_groups(draws: Sequence[Draw]) -> list[tuple[Tensor, Tensor]]:
    """`sample_draws` without the guesses."""
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(draws)
    groups: dict[tuple, list[int]] = {}
    for i, d in enumerate(draws):
        table = None if d.allowed is None else id(d.allowed)
        groups.setdefault((d.temperature, d.top_k, d.top_p, table), []).append(i)
    for (temperature, top_k, top_p, _), idx in groups.items():
        rows = [draws[i].logits for i in idx]
        sizes = [int(r.shape[0]) for r in rows]
        logits = torch.cat(rows) if len(rows) > 1 else rows[0]
        allowed = draws[idx[0]].allowed
        if allowed is not None:  # raw rows: the constraints of every job at once
            at = [draws[i].allowed_rows for i in idx]
            banned = allowed[torch.cat(at) if len(at) > 1 else at[0]].logical_not_()
            logits = logits.float().masked_fill_(banned, float("-inf"))
        if temperature == 0 or logits.shape[0] == 0:
            tokens = sample_tokens(logits, 0.0) if temperature == 0 else logits.new_zeros(
                0, dtype=torch.long)  # fmt: skip
        else:
            for i in idx:
                if draws[i].generator is None:
                    raise InvalidArgument("sampling at temperature > 0 needs a generator",
                                          field="seed")  # fmt: skip
            # each draw's noise from its own generator; the rest once for all
            V = logits.shape[1]
            u = [noise_for(n, V, draws[i].generator) for i, n in zip(idx, sizes, strict=True)]
            tokens = sample_with_noise(logits, temperature, top_k, top_p,
                                       torch.cat(u) if len(u) > 1 else u[0])  # fmt: skip
        probs = None
        start = 0
        for i, n in zip(idx, sizes, strict=True):
            tok = tokens[start : start + n]
            if draws[i].score == "probability":
                if probs is None:  # each chosen id's probability, without a softmax's [N, V]
                    lf = logits.float()
                    probs = (lf.gather(-1, tokens[:, None])[:, 0] - lf.logsumexp(dim=-1)).exp()
                conf = probs[start : start + n]
            else:
                conf = score_positions(logits[start : start + n], tok, draws[i].score)
            out[i] = (tok, conf)
            start += n
    return out  # type: ignore[return-value]


def plan_block_steps(steps: int, block_sizes: list[int]) -> list[int]:
    """Split `steps` over blocks in proportion to their size: each gets 1..size, sum == steps."""
    total = sum(block_sizes)
    if not len(block_sizes) <= steps <= total:
        raise InvalidArgument(
            f"must be in [{len(block_sizes)}, {total}] for this canvas", field="steps", value=steps
        )
    alloc = [1] * len(block_sizes)
    # max-heap on the deficit against the ideal share; ties go to the earlier block
    heap = [(-(steps * n / total - 1), i) for i, n in enumerate(block_sizes) if n > 1]
    heapq.heapify(heap)
    for _ in range(steps - len(block_sizes)):
        _, i = heapq.heappop(heap)
        alloc[i] += 1
        if alloc[i] < block_sizes[i]:
            heapq.heappush(heap, (-(steps * block_sizes[i] / total - alloc[i]), i))
    return alloc


def planned_commits(remaining: int, steps_left: int) -> int:
    """Tokens to commit now so `remaining` finish in `steps_left` steps, spread evenly with the
    remainder on the earliest steps (n=10, s=4 -> 3, 3, 2, 2)."""
    if remaining <= 0:
        return 0
    return -(-remaining // max(steps_left, 1))


def factor_ok(scores: Tensor, factor: float) -> Tensor:
    """bool [N]: Fast-dLLM's factor rule for rows in commit order (most confident first, or
    left to right): committing the first n rows is allowed while (n + 1) * (1 - c_n) < factor,
    c_n the n-th row's confidence. Many commits need each of them near-certain; one is free."""
    n = torch.arange(2, scores.numel() + 2, device=scores.device, dtype=scores.dtype)
    return n * (1 - scores) < factor


def select_commits(
    scores: Tensor, count: int, threshold: float | None = None, factor: float | None = None
) -> Tensor:
    """Indices (ascending) of the rows to commit: the `count` most confident, plus every row at
    or above `threshold`, plus as many of the most confident as the factor rule allows
    (`factor_ok`); at least one when there is any row."""
    n = scores.numel()
    k = count
    if threshold is not None:
        k = max(k, int((scores >= threshold).sum()))
    order = torch.sort(scores, descending=True, stable=True).indices
    if factor is not None and n:
        k = max(k, int(factor_ok(scores[order], factor).int().cumprod(0).sum()))
    k = min(max(k, 1), n)
    return order[:k].sort().values


def select_leftmost(
    scores: Tensor, count: int, threshold: float | None = None, factor: float | None = None
) -> Tensor:
    """Indices of the leftmost rows to commit: `count` of them, extended while the next row's
    score reaches `threshold` or the factor rule (`factor_ok`, rows in canvas order) allows it;
    at least one when there is any row. Rows are in canvas order."""
    n = scores.numel()
    k = min(max(count, 1), n)
    if threshold is None and factor is None:
        return torch.arange(k, device=scores.device)
    ok = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if threshold is not None:
        ok |= scores >= threshold
    if factor is not None:
        ok |= factor_ok(scores, factor)
    flags = ok.tolist()
    while k < n and flags[k]:
        k += 1
    return torch.arange(k, device=scores.device)


def select_remask(confidence: Tensor, threshold: float, budget: int) -> Tensor:
    """Indices of committed rows to re-open: below `threshold`, least confident first, <= budget."""
    if budget <= 0 or confidence.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=confidence.device)
    order = torch.sort(confidence, stable=True).indices
    low = order[confidence[order] < threshold]
    return low[:budget]


def kv_keep(cache: KVCache, positions: Tensor, copy: bool = False) -> KVCache:
    """The cache restricted to some of its stored positions (RoPE is already in the keys);
    views where they are a range, unless `copy`."""
    positions = positions.to(cache.pad_mask.device)
    n = positions.numel()
    if not copy and n and bool((positions.diff() == 1).all()):  # a range: views, no copy
        a, b = int(positions[0]), int(positions[-1]) + 1
        return KVCache([(k[:, :, a:b], v[:, :, a:b]) for k, v in cache.layers],
                       cache.pad_mask[:, a:b])  # fmt: skip
    layers = [(k.index_select(2, positions), v.index_select(2, positions)) for k, v in cache.layers]
    return KVCache(layers, cache.pad_mask.index_select(1, positions))


# ---------------------------------------------------------------------------------------------
# Events and results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StepEvent:
    """What one denoising step did; positions are canvas indices."""

    step: int
    block: int
    committed_positions: Tensor
    committed_ids: Tensor
    committed_confidence: Tensor
    tentative_positions: Tensor  # still masked after this step (current block)
    tentative_ids: Tensor  # the model's current guess for them
    tentative_confidence: Tensor
    remasked_positions: Tensor


@dataclass(frozen=True, eq=False)
class SampleResult:
    ids: Tensor  # LongTensor [T]: the final canvas; PAD after a truncating EOS
    generated: Tensor  # BoolTensor [T]: positions the sampler filled (PAD truncation excluded)
    nfe: int  # forward passes
    steps: int  # denoising steps (AR: tokens decoded)
    finish_reason: str  # "length" | "eos" | "max_steps"
    tokens_per_forward: float

    @property
    def generated_ids(self) -> list[int]:
        return self.ids[self.generated].tolist()


StepHook = Callable[[StepEvent], None]
# a step event's empty fields (never written to)
_NO_POSITIONS = torch.zeros(0, dtype=torch.long)
_NO_SCORES = torch.zeros(0)


# ---------------------------------------------------------------------------------------------
# Per-job state
# ---------------------------------------------------------------------------------------------


class SamplerState:
    """One masked-diffusion job between steps.

    Loop: `inputs = state.prepare_inputs()`, run the model on `inputs`, then
    `state.advance(logits_for_this_job, cache_for_this_job)`; stop when `state.done`.
    """

    def __init__(
        self,
        canvas: Canvas,
        params: SamplerParams,
        vocab: SamplerVocab,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        if canvas.n_masked != params.gen_length:
            raise InvalidArgument(
                f"must equal the canvas's masked positions ({canvas.n_masked})",
                field="gen_length",
                value=params.gen_length,
            )
        rows = vocab.modality_rows
        for seg_modality in set(_span_modalities(canvas)):
            if seg_modality not in rows:
                known = ", ".join(str(m) for m in rows if m is not None) or "none"
                raise InvalidArgument(
                    f"no modality mask for this modality (known: {known})",
                    field="modality",
                    value=seg_modality,
                )
        self.params = params
        self.vocab = vocab
        self.device = torch.device(device)
        self.layout: CanvasLayout = canvas.layout(vocab.mask_id, params.block_length, self.device)
        self.ids = self.layout.ids.clone()
        self.masked = ~self.layout.fixed
        self.cleared = torch.zeros_like(self.masked)  # positions turned into PAD after EOS
        self.canvas_index: Tensor | None = None  # slot -> canvas position (None: the same)
        # the step events carry the model's guess for the positions left open; a caller that
        # reads no events (a unary request) sets this False and those rows are never computed
        self.tentative = True
        self.modality_rows = torch.tensor(
            [rows[m] for m in self.layout.modality], dtype=torch.long, device=self.device
        )
        self.blocks: list[Tensor] = list(self.layout.blocks)
        self.block_steps = plan_block_steps(params.steps, [b.numel() for b in self.blocks])
        self.block = 0  # index of the current block
        self.block_step = 0  # steps taken inside the current block
        self.step = 0
        self.nfe = 0
        self.remask_left = params.remask_budget
        self.finish_reason: str | None = None
        self.saw_eos = False
        self.generator = torch.Generator(device="cpu").manual_seed(params.seed)
        self.cache: KVCache | None = None  # K/V reused by the steps of the current block
        self._tables: ConstraintTables | None = None
        self._pinned: dict[int, Tensor] = {}  # position -> its only ids (`Masked.first`)
        self._grammar_spans = True  # some position gets the MIDI grammar (set with the tables)
        self._pending: StepInputs | None = None
        self._step_state: tuple | None = None  # between propose() and finish_step()

    # ---- queries ----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return self.layout.length

    def block_bounds(self) -> tuple[int, int]:
        """[lo, hi): the canvas range the current block's positions lie in."""
        blk = self.blocks[self.block]
        return int(blk[0]), int(blk[-1]) + 1

    # ---- the two halves of a step -----------------------------------------------------------
    def prepare_inputs(self) -> StepInputs:
        """The window to run this step. "prefix": the block and everything right of it, attending
        to cached K/V of the left; "dual": only the block, attending to cached K/V of both sides.
        The first step of a block (and "none") runs the full canvas; in a cache mode it also asks
        for the K/V, which `advance` trims to the reusable part. For a bidirectional model both
        caches are approximations (cached K/V saw the block still masked); for a causal model
        "prefix" is exact, "dual" is not (the window would attend to its cached right side)."""
        if self.done:
            raise InvalidArgument("the job has finished", field="state")
        lo, hi = self.block_bounds()
        mode = self.params.use_cache
        if mode != "none" and self.cache is not None:
            stop = self.length if mode == "prefix" else hi
            inputs = StepInputs(
                self.ids[None, lo:stop], lo, self.cache, use_cache=False, out_len=hi - lo
            )
        else:
            reusable = lo > 0 or (mode == "dual" and hi < self.length)
            inputs = StepInputs(
                self.ids[None], 0, None, mode != "none" and reusable, out_offset=lo, out_len=hi - lo
            )
        self._pending = inputs
        return inputs

    def advance(self, logits: Tensor, cache: KVCache | None = None) -> StepEvent:
        """Apply one denoising step given this job's logits [W, V] (or [1, W, V]) for the window
        from `prepare_inputs`, and its KVCache when that window asked for one."""
        draw = self.propose(logits, cache)
        return self.finish_step(draw, *sample_draws([draw])[0])

    def propose(self, logits: Tensor, cache: KVCache | None = None) -> Draw:
        """The first half of `advance`: bookkeeping and the constrained logits to sample from.
        An engine samples the draws of all its jobs together (`sample_draws`), then calls
        `finish_step` for each: the same tokens as `advance`, job by job."""
        inputs = self._pending
        if inputs is None:
            raise InvalidArgument("call prepare_inputs() before advance()", field="state")
        self._pending = None
        logits = logits.reshape(-1, logits.shape[-1])
        # logits cover the window offsets [out_offset, out_offset + n_out) (the current block),
        # or the whole window when the caller computed them all
        if logits.shape[0] == inputs.n_out:
            first = inputs.start_pos + inputs.out_offset
        elif logits.shape[0] == inputs.width:
            first = inputs.start_pos
        else:
            raise InvalidArgument(
                f"expected logits for {inputs.n_out} positions", field="logits", value=logits.shape
            )
        self.nfe += 1
        if inputs.use_cache:
            if cache is None:
                raise InvalidArgument("this step asked for a KVCache", field="cache")
            self.cache = kv_keep(cache, self._reused_positions())
        tables = self._constraint_tables(logits.shape[-1])
        p = self.params

        block_pos = self.blocks[self.block]
        is_open = self.masked[block_pos]
        open_pos = block_pos[is_open]
        in_order = p.position_score == "left_to_right"
        score = "probability" if in_order else p.position_score
        # left to right at a fixed count: the leftmost `count` positions are committed whatever
        # their confidence, so only they are sampled; the rest get the model's best guess
        # (argmax) as their tentative token for the step's event, if anyone reads it
        n_open = n_draw = open_pos.numel()
        if in_order and p.threshold is None and p.threshold_factor is None:
            n_draw = self._fixed_draws(n_open)
            if not self.tentative:
                open_pos = open_pos[:n_draw]
        drawn = open_pos[:n_draw]
        open_logits: Tensor | None = None  # constrained rows of open_pos, when built here
        if score == "probability" and self._shared_constraints(drawn):
            rest = open_pos[n_draw:]
            guess = None  # the tentative rest, in the batched sampling when it can be
            if rest.numel() and self._shared_constraints(rest):
                guess = Draw(logits[rest - first], 0.0, 0, 1.0, None, "probability",
                             tables.allowed, self.modality_rows[rest])  # fmt: skip
            draw = Draw(logits[drawn - first], p.temperature, p.top_k, p.top_p, self.generator,
                        score, tables.allowed, self.modality_rows[drawn], guess)  # fmt: skip
        else:
            open_logits = self._constrained(logits, open_pos, first, tables)
            draw = Draw(open_logits[:n_draw], p.temperature, p.top_k, p.top_p, self.generator,
                        score)  # fmt: skip
        self._step_state = (logits, first, tables, block_pos, is_open, open_pos, open_logits,
                            n_draw, n_open)  # fmt: skip
        return draw

    def _shared_constraints(self, positions: Tensor) -> bool:
        """True when the positions' constraints are their modality's row of the shared table
        alone: no grammar span in this job, no pinned ids among them."""
        if self._grammar_spans:
            return False
        return not self._pinned or not any(q in self._pinned for q in positions.tolist())

    def _fixed_draws(self, n_open: int) -> int:
        """Left to right at a fixed count: how many of the leftmost open positions are sampled."""
        return min(max(self._commit_count(n_open), 1), n_open)

    def read_positions(self, n_open: int) -> int | None:
        """How many of the block's leftmost open positions this step reads logits of: all of
        them (None) unless it commits a fixed count left to right and reports no guesses for
        the rest (no step events); then only those it samples."""
        p = self.params
        if (self.tentative or p.position_score != "left_to_right" or p.threshold is not None
                or p.threshold_factor is not None):  # fmt: skip
            return None
        return self._fixed_draws(n_open)

    def _commit_count(self, n_open: int) -> int:
        """Tokens the fixed schedule commits this step (all of them on a capped last step)."""
        p = self.params
        if p.max_steps is not None and self.step + 1 >= p.max_steps:
            return n_open
        return planned_commits(n_open, self.block_steps[self.block] - self.block_step)

    def finish_step(self, draw: Draw, tokens: Tensor, conf: Tensor) -> StepEvent:
        """The second half of `advance`: commit, remask, and say what the step did."""
        if self._step_state is None:
            raise InvalidArgument("call propose() before finish_step()", field="state")
        logits, first, tables, block_pos, is_open, open_pos, open_logits, n_draw, n_open = (
            self._step_state
        )
        self._step_state = None
        p = self.params
        in_order = p.position_score == "left_to_right"
        if n_draw < open_pos.numel() and draw.guess is None:  # the tentative rest: argmax
            rest = (
                open_logits[n_draw:]
                if open_logits is not None
                else self._constrained(logits, open_pos[n_draw:], first, tables)
            )
            best = rest.argmax(dim=-1)
            tokens = torch.cat([tokens, best])
            conf = torch.cat([conf, score_positions(rest, best, "probability")])

        steps_left = self.block_steps[self.block] - self.block_step
        last_step = p.max_steps is not None and self.step + 1 >= p.max_steps
        count = n_open if last_step else planned_commits(n_open, steps_left)
        if in_order:
            chosen = select_leftmost(conf, count, p.threshold, p.threshold_factor)
        else:
            chosen = select_commits(conf, count, p.threshold, p.threshold_factor)
        commit_pos = open_pos[chosen]
        if in_order and p.grammar and chosen.numel() > 1:
            # commit left to right, each token re-drawn under the grammar given the one just
            # committed on its left (parallel commits would not see each other)
            for i in chosen.tolist():
                pos = open_pos[i : i + 1]
                row = self._constrained(logits, pos, first, tables)
                tokens[i] = sample_tokens(row, p.temperature, p.top_k, p.top_p, self.generator)[0]
                self.ids[pos] = tokens[i]
                self.masked[pos] = False
        self.ids[commit_pos] = tokens[chosen]
        self.masked[commit_pos] = False

        if self.remask_left > 0:
            remasked = self._remask(logits, first, tables, block_pos[~is_open], steps_left,
                                    last_step)  # fmt: skip
        else:
            remasked = _NO_POSITIONS
        if chosen.numel() == open_pos.numel():  # all of them (every step of a unary job)
            committed, tentative = (tokens, conf), (_NO_POSITIONS, _NO_POSITIONS, _NO_SCORES)
        else:
            keep = torch.ones(open_pos.numel(), dtype=torch.bool, device=open_pos.device)
            keep[chosen] = False
            committed = (tokens[chosen], conf[chosen])
            tentative = (open_pos[keep], tokens[keep], conf[keep])
        event = StepEvent(self.step, self.block, commit_pos, *committed, *tentative, remasked)
        self.step += 1
        self.block_step += 1
        if not bool(self.masked[block_pos].any()):
            self._finish_block()
        if not self.done and last_step:
            self._finish("max_steps")
        return event

    def result(self) -> SampleResult:
        generated = ~self.layout.fixed & ~self.cleared
        n = int(generated.sum())
        return SampleResult(
            ids=self.ids.clone(),
            generated=generated,
            nfe=self.nfe,
            steps=self.step,
            finish_reason=self.finish_reason or "length",
            tokens_per_forward=n / max(self.nfe, 1),
        )

    # ---- internals --------------------------------------------------------------------------
    def _constraint_tables(self, vocab_size: int) -> ConstraintTables:
        if self._tables is None or self._tables.allowed.shape[1] != vocab_size:
            t = self._tables = self.vocab.tables(vocab_size, self.device)
            self._pinned = pin_masks(self.layout.pinned, vocab_size, self.device)
            self._grammar_spans = has_grammar_spans(t, self.modality_rows, self.params.grammar)
        return self._tables

    def _constrained(
        self, logits: Tensor, positions: Tensor, start_pos: int, tables: ConstraintTables
    ) -> Tensor:
        """Constrained fp32 logits of canvas `positions` from the window's logits."""
        constrained = apply_constraints(
            logits[positions - start_pos].float(),
            positions,
            self.ids,
            self.masked,
            self.modality_rows,
            tables,
            self.params.grammar,
            self.canvas_index,
        )
        return apply_pinned(constrained, positions, self._pinned)

    def _reused_positions(self) -> Tensor:
        """Positions of the full-canvas cache that the block's later steps reuse."""
        lo, hi = self.block_bounds()
        left = torch.arange(lo, device=self.device)
        if self.params.use_cache == "prefix":
            return left
        return torch.cat([left, torch.arange(hi, self.length, device=self.device)])

    def _remask(
        self,
        logits: Tensor,
        start_pos: int,
        tables: ConstraintTables,
        earlier: Tensor,
        steps_left: int,
        last_step: bool,
    ) -> Tensor:
        """Re-open tokens of this block committed in earlier steps whose probability under the
        current logits fell below remask_threshold. Only inside the current block (earlier blocks
        are cached and final) and only while a step is left to refill them, so `steps` still
        bounds the run. Block positions are never fixed, so fixed tokens are never re-opened."""
        none = torch.zeros(0, dtype=torch.long, device=earlier.device)
        if self.remask_left <= 0 or steps_left <= 1 or last_step or earlier.numel() == 0:
            return none
        pos = earlier
        prob = score_positions(
            self._constrained(logits, pos, start_pos, tables), self.ids[pos], "probability"
        )
        chosen = select_remask(prob, self.params.remask_threshold, self.remask_left)
        reopen = pos[chosen]
        self.ids[reopen] = self.vocab.mask_id
        self.masked[reopen] = True
        self.remask_left -= reopen.numel()
        return reopen.sort().values

    def _finish_block(self) -> None:
        """A block is complete: apply the EOS stop, then move to the next block."""
        blk = self.blocks[self.block]
        if self.params.stop_at_eos:
            eos = blk[self.ids[blk] == self.vocab.eos_id]
            if eos.numel():
                self.saw_eos = True
                self._truncate_after(int(eos.min()))
        self.block += 1
        self.block_step = 0
        self.cache = None  # the next block's prefix includes this block: recompute
        # drop blocks emptied by an EOS truncation; the budgets of the rest are unchanged
        while self.block < len(self.blocks):
            rest = self.blocks[self.block]
            rest = rest[~self.cleared[rest]]
            if rest.numel():
                self.blocks[self.block] = rest
                break
            del self.blocks[self.block]
            del self.block_steps[self.block]
        if self.block >= len(self.blocks):
            self._finish("eos" if self.saw_eos else "length")

    def _truncate_after(self, eos_pos: int) -> None:
        """Everything after the EOS in its span becomes PAD (other spans of an infill canvas are
        independent and keep generating)."""
        span = self.layout.span
        after = torch.arange(self.length, device=self.device) > eos_pos
        clear = after & (span == span[eos_pos])
        self.ids[clear] = self.vocab.pad_id
        self.masked[clear] = False
        self.cleared |= clear

    def _finish(self, reason: str) -> None:
        # nothing may stay MASK in a result: unreached positions become PAD
        left = self.masked.clone()
        self.ids[left] = self.vocab.pad_id
        self.masked[left] = False
        self.cleared |= left
        self.finish_reason = reason
        self.cache = None


def _span_modalities(canvas: Canvas) -> list[str | None]:
    return [s.modality for s in canvas.segments if isinstance(s, Masked)]


# ---------------------------------------------------------------------------------------------
# Top level
# ---------------------------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_fits(model: torch.nn.Module, length: int, field_name: str) -> None:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_seq_len", None)
    if limit is not None and length > limit:
        raise InvalidArgument(
            f"canvas of {length} positions exceeds the model's max_seq_len {limit}",
            field=field_name,
            value=length,
        )


def _check_ids(model: torch.nn.Module, canvas: Canvas) -> None:
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    fixed = [t for s in canvas.segments if not isinstance(s, Masked) for t in s.ids]
    if vocab_size is not None and fixed and max(fixed) >= vocab_size:
        raise InvalidArgument(
            f"fixed token ids must be < the model's vocab size {vocab_size}",
            field="canvas",
            value=max(fixed),
        )


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    canvas: Canvas,
    params: SamplerParams,
    vocab: SamplerVocab,
    on_step: StepHook | None = None,
) -> SampleResult:
    """Fill every masked span of `canvas`; a pure function of (model, canvas, params)."""
    check_fits(model, canvas.length, "gen_length")
    _check_ids(model, canvas)
    from unmask.models.block_sampler import new_state  # late: it builds on this module

    state = new_state(model, canvas, params, vocab, device=model_device(model))
    state.tentative = on_step is not None  # guesses for open positions only feed step events
    while not state.done:
        logits, cache = step_logits(model, state.prepare_inputs())
        event = state.advance(logits, cache)
        if on_step is not None:
            on_step(event)
    return state.result()
