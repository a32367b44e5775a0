"""The Generator of a public checkpoint: the same request → canvas → sampler → output path as our
own models (models/generation.py), over the checkpoint's tokenizer instead of the unified
vocabulary. Text and code only: MIDI, MIDI settings and grammar masks belong to our vocabulary
and are refused with an INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unmask.errors import InvalidArgument
from unmask.models.canvas import Canvas, Fixed, Masked, Segment
from unmask.models.constraints import SamplerVocab
from unmask.models.generation import Generator, Prepared, fit_params
from unmask.models.sampler import SampleResult
from unmask.models.sampler_params import SamplerParams
from unmask.models.template import parse_template
from unmask.tokenizers.hf import HFTokenizer


class PublicGenerator(Generator):
    """A Generator over a public checkpoint (models/hf_checkpoint.py)."""

    def __init__(self, model: torch.nn.Module, vocab: HFTokenizer, meta: dict) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.meta = meta
        self.is_ar = False
        V = int(model.config.vocab_size)
        allowed = torch.ones(V, dtype=torch.bool)
        self.sampler_vocab = SamplerVocab(
            mask_id=vocab.mask_id, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
            modality_masks={"text": allowed, "code": allowed.clone()},
        )  # fmt: skip

    @classmethod
    def load(  # type: ignore[override]
        cls, model_dir: str | Path, device: str = "cpu", dtype: str | None = None
    ) -> PublicGenerator:
        from unmask.models.hf_checkpoint import load_hf

        model, tok, meta = load_hf(model_dir, device=device, dtype=dtype)
        return cls(model, tok, meta)

    # ---- what this model cannot do ------------------------------------------------------------
    def _refuse(self, request: Any) -> None:
        name = self.meta.get("family", "public")
        if request.modality == "midi" or request.kind == "midi_infill":
            raise InvalidArgument(
                f"this {name} model generates text and code only; MIDI needs unmask's own "
                "vocabulary", field="modality", value=request.modality,
            )  # fmt: skip
        if getattr(request, "midi_settings", None) is not None:
            raise InvalidArgument(
                "MIDI settings need unmask's own vocabulary", field="midi_settings"
            )

    def _check_params(self, params: SamplerParams) -> None:
        modes = self.meta.get("cache_modes") or {}
        if modes and params.use_cache not in modes:
            raise InvalidArgument(
                f"this {self.meta.get('family')} model allows use_cache "
                f"{' or '.join(sorted(modes))}",
                field="use_cache",
                value=params.use_cache,
            )
        block = int(self.meta.get("block_size") or 0)
        if (
            block
            and "block_length" not in params.unset
            and params.block_length not in (None, 0, block)
        ):
            raise InvalidArgument(
                f"this model decodes in its trained blocks of {block} tokens",
                field="block_length",
                value=params.block_length,
            )

    def resolve(self, params: SamplerParams, modality: str) -> SamplerParams:
        """The model's defaults, then this model's limits (cache modes, block size): every
        prepare path comes through here."""
        params = super().resolve(params, modality)
        self._check_params(params)
        # the MIDI grammar never applies to text/code spans; keep it off so nothing reads it
        return dataclasses.replace(params, grammar=False) if params.grammar else params

    # ---- prepare --------------------------------------------------------------------------------
    def header(self, modality: str) -> list[int]:
        return []  # no modality tags; BOS (where the family wants it) starts the prompt

    def prompt_ids(self, modality: str, prompt: str | bytes | None) -> list[int]:
        if modality not in HFTokenizer.modalities:
            raise InvalidArgument("text and code only", field="modality", value=modality)
        if isinstance(prompt, bytes):
            raise InvalidArgument("a text/code prompt must be a string", field="prompt")
        bos = (
            [self.vocab.bos_id]
            if self.meta.get("add_bos") and self.vocab.bos_id is not None
            else []
        )
        return bos + self.vocab.encode_text(prompt or "")

    def prepare(self, request: Any) -> Prepared:
        self._refuse(request)
        chat = getattr(request, "chat", None)
        if chat:
            return self.prepare_chat(request.modality, chat, request.params)
        return super().prepare(request)

    def prepare_chat(
        self, modality: str, messages: Sequence[Sequence[str]], params: SamplerParams
    ) -> Prepared:
        """The checkpoint's own chat template over (role, content) `messages`, then the
        assistant's turn; the output is the answer alone."""
        ids = self.vocab.encode_chat([{"role": r, "content": c} for r, c in messages])
        return self.prepare_from_ids(modality, ids, params, field="chat")

    def prepare_infill(
        self, modality: str, template: str | Sequence[str | int], params: SamplerParams
    ) -> Prepared:
        params = self.resolve(params, modality)
        parts = parse_template(template) if isinstance(template, str) else tuple(template)
        head = self.prompt_ids(modality, "")
        segments: list[Segment] = [Fixed(head)] if head else []
        encoded: list[list[int] | int] = []
        for p in parts:
            if isinstance(p, int):
                segments.append(Masked(p, modality))
                encoded.append(p)
            else:
                ids = self.vocab.encode_text(p)
                encoded.append(ids)
                if ids:
                    segments.append(Fixed(ids))
        canvas = self._check_canvas(Canvas(segments))

        def decode(result: SampleResult) -> str:
            ids = result.ids.tolist()
            out, pos = [], len(head)  # gap by gap: the fixed text comes back exactly as given
            for p, enc in zip(parts, encoded, strict=True):
                if isinstance(p, int):
                    gap = self.vocab.strip_specials(ids[pos : pos + p])
                    out.append(self.vocab.decode(gap) if gap else "")
                    pos += p
                else:
                    out.append(p)
                    pos += len(enc)  # type: ignore[arg-type]
            return "".join(out)

        return Prepared(
            modality, canvas, fit_params(params, canvas.n_masked), None,
            canvas.length - canvas.n_masked, decode,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """What ListModels / GetModel report for this model."""
        keys = ("family", "architecture", "parameters", "dtype", "mask_id", "attention",
                "block_size", "modalities", "content_hash", "shift", "cache_modes")  # fmt: skip
        return {k: self.meta.get(k) for k in keys}
