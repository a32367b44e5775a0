"""A generation canvas: fixed token segments around masked spans.

Prompting is a canvas `[Fixed(prompt), Masked(n)]`; infilling is `[Fixed(a), Masked(n), Fixed(b)]`.
`Canvas.layout` turns it into the tensors the sampler works on: the initial ids (MASK in every
span), which positions are fixed, each position's modality (for constraints) and span, and the
partition of masked positions into semi-autoregressive blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from unmask.errors import InvalidArgument

MAX_CANVAS_LENGTH = 1 << 20


@dataclass(frozen=True)
class Fixed:
    """Token ids the sampler never changes (prompt, or context around a gap)."""

    ids: tuple[int, ...]

    def __init__(self, ids: Iterable[int]) -> None:
        object.__setattr__(self, "ids", tuple(int(i) for i in ids))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Masked:
    """A span of `length` positions to generate; `modality` selects its allowed ids, `first`
    (when given) narrows its first position to those ids (token healing)."""

    length: int
    modality: str | None = None
    first: tuple[int, ...] = ()

    def __len__(self) -> int:
        return self.length


Segment = Fixed | Masked


@dataclass(frozen=True)
class CanvasLayout:
    """Per-position tensors of a canvas (all 1-D over the canvas length T)."""

    ids: torch.Tensor  # LongTensor[T]: fixed ids, mask_id in every masked span
    fixed: torch.Tensor  # BoolTensor[T]: True where the token can never change
    modality: tuple[str | None, ...]  # per position; None for fixed or unconstrained positions
    span: torch.Tensor  # LongTensor[T]: index of the masked span, -1 for fixed positions
    blocks: tuple[torch.Tensor, ...]  # LongTensor positions per block, left to right
    pinned: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (position, its only allowed ids)

    @property
    def length(self) -> int:
        return int(self.ids.numel())


@dataclass(frozen=True)
class Canvas:
    segments: tuple[Segment, ...]

    def __init__(self, segments: Sequence[Segment]) -> None:
        segments = tuple(segments)
        for i, seg in enumerate(segments):
            if isinstance(seg, Masked):
                if not isinstance(seg.length, int) or isinstance(seg.length, bool):
                    raise InvalidArgument("span length must be an integer", field="canvas")
                if seg.length < 1:
                    raise InvalidArgument(
                        f"masked span {i} must have length >= 1", field="canvas", value=seg.length
                    )
            elif isinstance(seg, Fixed):
                if any(t < 0 for t in seg.ids):
                    raise InvalidArgument(f"segment {i} holds a negative token id", field="canvas")
            else:
                raise InvalidArgument(
                    f"segment {i} must be Fixed or Masked", field="canvas", value=type(seg).__name__
                )
        if not any(isinstance(s, Masked) for s in segments):
            raise InvalidArgument("a canvas needs at least one masked span", field="canvas")
        total = sum(len(s) for s in segments)
        if total > MAX_CANVAS_LENGTH:
            raise InvalidArgument(
                f"canvas length must be <= {MAX_CANVAS_LENGTH}", field="canvas", value=total
            )
        object.__setattr__(self, "segments", segments)

    @classmethod
    def from_prompt(
        cls, prompt_ids: Iterable[int], gen_length: int, modality: str | None = None
    ) -> Canvas:
        """The common case: a prompt followed by `gen_length` masked positions."""
        prompt = Fixed(prompt_ids)
        segments: list[Segment] = [prompt] if len(prompt) else []
        return cls([*segments, Masked(gen_length, modality)])

    @property
    def length(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def n_masked(self) -> int:
        return sum(s.length for s in self.segments if isinstance(s, Masked))

    def layout(
        self, mask_id: int, block_length: int | None = None, device: torch.device | str = "cpu"
    ) -> CanvasLayout:
        ids: list[int] = []
        modality: list[str | None] = []
        span: list[int] = []
        pinned: list[tuple[int, tuple[int, ...]]] = []
        n_spans = 0
        for seg in self.segments:
            if isinstance(seg, Fixed):
                ids.extend(seg.ids)
                modality.extend([None] * len(seg))
                span.extend([-1] * len(seg))
            else:
                if seg.first:
                    pinned.append((len(ids), tuple(int(i) for i in seg.first)))
                ids.extend([mask_id] * seg.length)
                modality.extend([seg.modality] * seg.length)
                span.extend([n_spans] * seg.length)
                n_spans += 1
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        span_t = torch.tensor(span, dtype=torch.long, device=device)
        fixed = span_t < 0
        if bool((ids_t[fixed] == mask_id).any()):
            # A MASK in a fixed segment would be regenerated: the caller meant a Masked span.
            raise InvalidArgument("fixed segments must not contain the mask id", field="canvas")
        return CanvasLayout(
            ids=ids_t,
            fixed=fixed,
            modality=tuple(modality),
            span=span_t,
            blocks=partition_blocks(torch.nonzero(~fixed).flatten(), block_length),
            pinned=tuple(pinned),
        )


def partition_blocks(
    masked_positions: torch.Tensor, block_length: int | None
) -> tuple[torch.Tensor, ...]:
    """Chunk the (sorted) masked positions into blocks of `block_length`, left to right."""
    if not block_length:
        return (masked_positions,)
    return tuple(torch.split(masked_positions, block_length))
