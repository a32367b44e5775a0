"""The autoregressive baseline's decoding: left to right with a KV cache (`prefill`, then
`decode_one_token`), as one call (`generate_ar`) or one step at a time (`ARState`, so an engine
batches AR jobs with each other as it batches diffusion jobs). It shares the diffusion sampler's
constraints and token sampling, so both models are held to the same grammar and the same draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from unmask.errors import InvalidArgument
from unmask.models.constraints import (
    ConstraintTables,
    SamplerVocab,
    apply_constraints,
    apply_pinned,
    pin_masks,
)
from unmask.models.network import KVCache
from unmask.models.sampler import (
    Draw,
    SampleResult,
    StepEvent,
    StepHook,
    StepInputs,
    check_fits,
    model_device,
    sample_draws,
    sample_tokens,
    score_positions,
)
from unmask.models.sampler_params import ARParams


def prefill(model: torch.nn.Module, ids: Tensor) -> tuple[Tensor, KVCache]:
    """Run the prompt [P] once; return the logits predicting the next token [V] and the cache."""
    logits, cache = model(ids[None], start_pos=0, use_cache=True)
    return logits[0, -1], cache


def decode_one_token(
    model: torch.nn.Module, token: int | Tensor, pos: int, cache: KVCache
) -> tuple[Tensor, KVCache]:
    """Feed one token at `pos` against the cache; return next-token logits [V] and the cache."""
    device = cache.pad_mask.device
    ids = torch.as_tensor(token, dtype=torch.long, device=device).reshape(1, 1)
    logits, cache = model(ids, start_pos=pos, past=cache, use_cache=True)
    return logits[0, -1], cache


def _full_forward_last(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """No-cache reference: recompute the whole sequence, return the last position's logits."""
    return model(ids[None])[0][0, -1]


def _ar_canvas(
    prompt_ids: Tensor | list[int],
    params: ARParams,
    vocab: SamplerVocab,
    modality: str | None,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The AR baseline's canvas-shaped buffers (so apply_constraints sees the previous token as
    in diffusion): ids [P + N] (prompt, then MASK), masked [P + N], modality rows [P + N], P."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).flatten()
    if prompt.numel() == 0:
        raise InvalidArgument(
            "the autoregressive baseline needs a non-empty prompt", field="prompt_ids"
        )
    rows = vocab.modality_rows
    if modality not in rows:
        raise InvalidArgument(
            "no modality mask for this modality", field="modality", value=modality
        )
    P, N = prompt.numel(), params.max_new_tokens
    ids = torch.full((P + N,), vocab.mask_id, dtype=torch.long, device=device)
    ids[:P] = prompt
    masked = torch.ones(P + N, dtype=torch.bool, device=device)
    masked[:P] = False
    modality_rows = torch.full((P + N,), rows[modality], dtype=torch.long, device=device)
    modality_rows[:P] = 0
    return ids, masked, modality_rows, P


@torch.inference_mode()
def generate_ar(
    model: torch.nn.Module,
    prompt_ids: Tensor | list[int],
    params: ARParams,
    vocab: SamplerVocab,
    *,
    modality: str | None = None,
    on_step: StepHook | None = None,
    first_allowed: Sequence[int] = (),
) -> SampleResult:
    """Left-to-right decoding (for a causal model): prefill, then one token per forward.
    `first_allowed` (token healing): the only ids the first new token may take."""
    device = model_device(model)
    ids, masked, modality_rows, P = _ar_canvas(prompt_ids, params, vocab, modality, device)
    prompt, N = ids[:P], params.max_new_tokens
    check_fits(model, P + N, "max_new_tokens")
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    tables: ConstraintTables | None = None
    pinned: dict[int, Tensor] = {}

    cache: KVCache | None = None
    if params.use_cache:
        logits, cache = prefill(model, prompt)
    else:
        logits = _full_forward_last(model, prompt)
    nfe, n_new, finish = 1, 0, "length"
    empty = torch.zeros(0, dtype=torch.long, device=device)
    for i in range(N):
        pos = P + i
        if tables is None:
            tables = vocab.tables(logits.shape[-1], device)
            pinned = pin_masks([(P, first_allowed)] if first_allowed else [],
                               logits.shape[-1], device)  # fmt: skip
        pos_t = torch.tensor([pos], device=device)
        row = apply_constraints(
            logits[None].float(), pos_t, ids, masked, modality_rows, tables, params.grammar
        )
        row = apply_pinned(row, pos_t, pinned)
        token = sample_tokens(row, params.temperature, params.top_k, params.top_p, generator)
        conf = score_positions(row, token, "probability")
        ids[pos], masked[pos] = token[0], False
        n_new += 1
        if on_step is not None:
            on_step(StepEvent(i, 0, pos_t, token, conf, empty, empty, empty.float(), empty))
        if params.stop_at_eos and int(token) == vocab.eos_id:
            finish = "eos"
            break
        if i + 1 == N:
            break  # the last token needs no forward
        if cache is not None:
            logits, cache = decode_one_token(model, token, pos, cache)
        else:
            logits = _full_forward_last(model, ids[: pos + 1])
        nfe += 1

    out = ids[: P + n_new].clone()
    generated = torch.zeros(P + n_new, dtype=torch.bool, device=device)
    generated[P:] = True
    return SampleResult(out, generated, nfe, n_new, finish, n_new / nfe)


class ARState:
    """One autoregressive job between steps, so the Engine batches AR jobs as it batches
    diffusion jobs: the first step is the prefill (the prompt; the logits of its last position),
    every later step one token against the job's KV cache. The same interface as SamplerState
    (`prepare_inputs` / `advance` / `done` / `result`, one "block" holding every new position),
    and the same tokens as `generate_ar` with its cache: the same constraints, the same draws
    from the same seeded generator, in the same order."""

    block = 0  # one block: the whole continuation

    def __init__(
        self,
        prompt_ids: Tensor | list[int],
        params: ARParams,
        vocab: SamplerVocab,
        *,
        modality: str | None = None,
        device: torch.device | str = "cpu",
        first_allowed: Sequence[int] = (),
    ) -> None:
        self.device = torch.device(device)
        self.params, self.vocab = params, vocab
        self.ids, self.masked, self.modality_rows, self.P = _ar_canvas(
            prompt_ids, params, vocab, modality, self.device
        )
        self.N = params.max_new_tokens
        self.blocks = [torch.arange(self.P, self.P + self.N, device=self.device)]
        self.generator = torch.Generator(device="cpu").manual_seed(params.seed)
        self.cache: KVCache | None = None
        self.nfe = 0
        self.step = 0  # tokens decoded
        self.finish_reason: str | None = None
        self._tables: ConstraintTables | None = None
        self._first_allowed = tuple(first_allowed)  # token healing: the first new token's ids
        self._pinned: dict[int, Tensor] = {}
        self._pending: StepInputs | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def prepare_inputs(self) -> StepInputs:
        if self.done:
            raise InvalidArgument("the job has finished", field="state")
        if self.cache is None:  # prefill: the whole prompt, logits of its last position
            inputs = StepInputs(self.ids[None, : self.P], 0, None, use_cache=True,
                                out_offset=self.P - 1, out_len=1)  # fmt: skip
        else:  # decode_one_token: the last token against the cache
            pos = self.P + self.step - 1
            inputs = StepInputs(self.ids[None, pos : pos + 1], pos, self.cache, use_cache=True,
                                out_len=1)  # fmt: skip
        self._pending = inputs
        return inputs

    def advance(self, logits: Tensor, cache: KVCache | None = None) -> StepEvent:
        draw = self.propose(logits, cache)
        return self.finish_step(draw, *sample_draws([draw])[0])

    def propose(self, logits: Tensor, cache: KVCache | None = None) -> Draw:
        if self._pending is None:
            raise InvalidArgument("call prepare_inputs() before advance()", field="state")
        if cache is None:
            raise InvalidArgument("an AR step needs its KVCache", field="cache")
        self._pending = None
        self.nfe += 1
        self.cache = cache
        logits = logits.reshape(-1, logits.shape[-1])[-1]  # [V]: predicts the next position
        if self._tables is None:
            self._tables = self.vocab.tables(logits.shape[-1], self.device)
            first = [(self.P, self._first_allowed)] if self._first_allowed else []
            self._pinned = pin_masks(first, logits.shape[-1], self.device)
        p = self.params
        pos_t = torch.tensor([self.P + self.step], device=self.device)
        row = apply_constraints(logits[None].float(), pos_t, self.ids, self.masked,
                                self.modality_rows, self._tables, p.grammar)  # fmt: skip
        row = apply_pinned(row, pos_t, self._pinned)
        return Draw(row, p.temperature, p.top_k, p.top_p, self.generator)

    def finish_step(self, draw: Draw, tokens: Tensor, conf: Tensor) -> StepEvent:
        pos = self.P + self.step
        pos_t = torch.tensor([pos], device=self.device)
        self.ids[pos], self.masked[pos] = tokens[0], False
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        event = StepEvent(self.step, 0, pos_t, tokens, conf, empty, empty, empty.float(), empty)
        self.step += 1
        if self.params.stop_at_eos and int(tokens[0]) == self.vocab.eos_id:
            self._finish("eos")
        elif self.step == self.N:
            self._finish("length")
        return event

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.cache = None

    def result(self) -> SampleResult:
        n = self.step
        out = self.ids[: self.P + n].clone()
        generated = torch.zeros(self.P + n, dtype=torch.bool, device=self.device)
        generated[self.P :] = True
        return SampleResult(out, generated, self.nfe, n, self.finish_reason or "length",
                            n / max(self.nfe, 1))  # fmt: skip
