"""Every knob of the masked-diffusion and autoregressive samplers, validated in one place.

A bad value raises InvalidArgument naming the field and its allowed range, so the CLI and the
gRPC layer can report it without a traceback. Both dataclasses are frozen and round-trip through
plain JSON-friendly dicts (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from unmask.errors import InvalidArgument

MAX_GEN_LENGTH = 65_536
MAX_STEPS = 1_000_000
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1_000_000
MAX_SEED = 2**63 - 1
MAX_THRESHOLD_FACTOR = 100.0

POSITION_SCORES = ("probability", "margin", "entropy", "left_to_right")
# knobs a model may choose for the caller: its config's `sampler_defaults` per modality fill the
# fields a request left unset (`SamplerParams.unset`); "tokens_per_step" sets `steps`
MODEL_DEFAULTABLE = (
    "steps", "block_length", "threshold", "threshold_factor", "position_score", "temperature", "top_k", "top_p",
    "remask_budget", "remask_threshold", "use_cache",
)  # fmt: skip
CACHE_MODES = ("none", "prefix", "dual")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    # bool is an int subclass; True as a length is always a caller bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"must be an integer in [{lo}, {hi}]", field=name, value=value)
    if not lo <= value <= hi:
        raise InvalidArgument(f"must be in [{lo}, {hi}], got {value}", field=name, value=value)


def _check_float(
    name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number in {rng}", field=name, value=value)
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if too_low or too_high:
        raise InvalidArgument(f"must be in {rng}, got {value}", field=name, value=value)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument("must be true or false", field=name, value=value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidArgument(f"must be one of {', '.join(choices)}", field=name, value=value)


def _check_sampling(p: Any) -> None:
    """The token-sampling knobs shared by both samplers."""
    _check_float("temperature", p.temperature, 0.0, MAX_TEMPERATURE)
    _check_int("top_k", p.top_k, 0, MAX_TOP_K)
    _check_float("top_p", p.top_p, 0.0, 1.0, lo_open=True)
    _check_int("seed", p.seed, 0, MAX_SEED)
    _check_bool("stop_at_eos", p.stop_at_eos)
    _check_bool("grammar", p.grammar)


class _DictMixin:
    """JSON-friendly round trip; unknown keys are an error, not silently dropped."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        if not isinstance(data, dict):
            raise InvalidArgument("sampler parameters must be a mapping", field=cls.__name__)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in data:
            if key not in known:
                raise InvalidArgument(
                    f"unknown parameter; allowed: {', '.join(sorted(known))}", field=key
                )
        return cls(**data)


@dataclass(frozen=True)
class SamplerParams(_DictMixin):
    """Masked-diffusion decoding parameters.

    gen_length:       masked tokens to generate (must equal the canvas's masked count).
    steps:            denoising steps; the fixed schedule commits gen_length/steps per step
                      (remainders go to the earliest steps). With `threshold` it is an upper bound.
    block_length:     semi-autoregressive block size over the masked positions; None/0 = one
                      block spanning the whole canvas.
    threshold:        commit every position whose confidence >= threshold (at least one, and at
                      least what keeps the run within `steps`); None = fixed schedule.
    threshold_factor: Fast-dLLM's factor rule: also commit the n most confident positions (left to
                      right: the leftmost n) while (n + 1) * (1 - confidence of the n-th) <
                      threshold_factor; a calibrated model commits several certain tokens in one
                      forward and one uncertain token alone. None = off. `steps` stays a bound.
    position_score:   confidence used to rank positions: probability of the sampled token,
                      top1-top2 probability margin, or exp(-entropy) (all in [0, 1]); or
                      "left_to_right": commit the leftmost open positions of the block (with a
                      threshold: also each next one whose probability reaches it), which avoids
                      the trivial-token bias of confidence-first order in a weak model.
    temperature:      0 = greedy (argmax); > 0 = sampling at that temperature.
    top_k, top_p:     nucleus/top-k filtering before sampling; 0 / 1.0 = off.
    remask_budget:    how many committed tokens may be re-opened over the whole run.
    remask_threshold: a committed token is re-opened when its current probability drops below.
    use_cache:        "none" (full forward each step), "prefix" (reuse K/V left of the block),
                      "dual" (also reuse K/V right of the block; Fast-dLLM DualCache).
    max_steps:        hard cap on denoising steps; None = no cap beyond `steps`.
    seed:             seeds the torch.Generator of the sampling noise.
    stop_at_eos:      a finished block holding EOS ends generation; what follows becomes PAD.
    grammar:          apply the MIDI grammar mask in MIDI spans.
    speculative:      self-speculative decoding (models/speculative.py): the same distribution as
                      left to right at one token per step, in fewer forward passes (each also
                      drafts the next positions and verifies the previous drafts). A block-causal
                      model at those defaults only. A seed gives other tokens than without it;
                      the Engine drafts only while the job is alone (beside others: plain steps
                      in the shared forward), so which tokens also depends on the load.
    unset:            the fields the caller did not set (names from MODEL_DEFAULTABLE): the
                      model's own defaults replace them (`with_defaults`), at the one place every
                      path goes through (models/generation.py). An unset `steps` is clipped to
                      what gen_length allows instead of failing.
    """

    gen_length: int = 128
    steps: int = 64
    block_length: int | None = None
    threshold: float | None = None
    threshold_factor: float | None = None
    position_score: str = "probability"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    remask_budget: int = 0
    remask_threshold: float = 0.1
    use_cache: str = "none"
    max_steps: int | None = None
    seed: int = 0
    stop_at_eos: bool = True
    grammar: bool = True
    speculative: bool = False
    unset: tuple[str, ...] = ()

    POSITION_SCORES: ClassVar[tuple[str, ...]] = POSITION_SCORES
    CACHE_MODES: ClassVar[tuple[str, ...]] = CACHE_MODES

    def __post_init__(self) -> None:
        unset = tuple(self.unset) if isinstance(self.unset, list | tuple) else self.unset
        if not isinstance(unset, tuple) or any(u not in MODEL_DEFAULTABLE for u in unset):
            raise InvalidArgument(
                f"names of unset fields among {', '.join(MODEL_DEFAULTABLE)}",
                field="unset",
                value=self.unset,
            )
        object.__setattr__(self, "unset", tuple(sorted(set(unset))))
        _check_int("gen_length", self.gen_length, 1, MAX_GEN_LENGTH)
        if "block_length" in unset and isinstance(self.block_length, int):
            object.__setattr__(self, "block_length", min(self.block_length, self.gen_length))
        if self.block_length is not None:
            _check_int("block_length", self.block_length, 0, self.gen_length)
            if self.block_length == 0:  # 0 is the wire format's "unset"
                object.__setattr__(self, "block_length", None)
        # Each block needs at least one step and each step commits at least one token.
        if "steps" in unset and isinstance(self.steps, int) and not isinstance(self.steps, bool):
            object.__setattr__(self, "steps", min(max(self.steps, self.n_blocks), self.gen_length))
        _check_int("steps", self.steps, self.n_blocks, self.gen_length)
        if self.threshold is not None:
            _check_float("threshold", self.threshold, 0.0, 1.0, lo_open=True)
        if self.threshold_factor is not None:
            _check_float(
                "threshold_factor", self.threshold_factor, 0.0, MAX_THRESHOLD_FACTOR, lo_open=True
            )
        _check_choice("position_score", self.position_score, POSITION_SCORES)
        _check_sampling(self)
        _check_bool("speculative", self.speculative)
        _check_int("remask_budget", self.remask_budget, 0, self.gen_length)
        _check_float("remask_threshold", self.remask_threshold, 0.0, 1.0)
        _check_choice("use_cache", self.use_cache, CACHE_MODES)
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, 1, MAX_STEPS)

    def to_wire(self) -> dict[str, Any]:
        """`to_dict` without the fields at their class default (lossless: `unset` is kept, and
        `from_dict` fills the rest with the same defaults). A message that uses no knob added
        after a worker was built then still parses there, so front ends can be upgraded first
        (both sides must agree on the class defaults, which no change so far has moved)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: v for k, v in self.to_dict().items() if k == "unset" or v != defaults[k]}

    def with_defaults(self, defaults: dict[str, Any] | None) -> SamplerParams:
        """These parameters with the unset fields taken from a model's `defaults` (a mapping of
        field -> value, plus "tokens_per_step" for steps); set fields are never changed."""
        if not self.unset:
            return self
        values = {k: v for k, v in (defaults or {}).items() if k in self.unset}
        tps = (defaults or {}).get("tokens_per_step")
        if "steps" in self.unset and isinstance(tps, int) and tps >= 1:
            values["steps"] = -(-self.gen_length // tps)
        # still marked unset while built, so a default is clipped to what gen_length allows
        return dataclasses.replace(dataclasses.replace(self, **values), unset=())

    @property
    def n_blocks(self) -> int:
        """Number of semi-AR blocks over gen_length masked positions."""
        if self.block_length is None:
            return 1
        return -(-self.gen_length // self.block_length)


@dataclass(frozen=True)
class ARParams(_DictMixin):
    """Left-to-right decoding parameters for the autoregressive baseline."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True
    grammar: bool = True
    use_cache: bool = True

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1, MAX_GEN_LENGTH)
        _check_sampling(self)
        _check_bool("use_cache", self.use_cache)
