"""Adapters that load public diffusion-LM checkpoints onto our one network (models/network.py):
LLaDA (llada.py), the Qwen2 family — Dream, DiffuCoder, Open-dCoder, Fast-dLLM v2 (qwen2.py) —
and the Qwen3 family — SDAR (qwen3.py). `detect(config)` picks one from config.json."""

from __future__ import annotations

from unmask.errors import CheckpointError
from unmask.models.families.base import Family, Specials
from unmask.models.families.llada import LLaDA
from unmask.models.families.qwen2 import Dream, FastDLLMv2
from unmask.models.families.qwen3 import SDAR

FAMILIES: tuple[type[Family], ...] = (LLaDA, Dream, FastDLLMv2, SDAR)


def detect(cfg: dict) -> Family:
    """The adapter for a checkpoint's config.json: by `architectures`, or by `model_type` when
    no architecture is named (a named but unknown one, e.g. a MoE variant sharing the
    model_type, is refused rather than guessed)."""
    archs = cfg.get("architectures") or []
    for family in FAMILIES:
        if any(a in family.architectures for a in archs):
            return family(cfg)
    for family in FAMILIES:
        if not archs and cfg.get("model_type") in family.model_types:
            return family(cfg)
    known = ", ".join(a for f in FAMILIES for a in f.architectures)
    raise CheckpointError(
        f"unknown architecture {archs or cfg.get('model_type')!r}: unmask serves {known}",
        field="architectures",
        value=archs,
    )


__all__ = ["FAMILIES", "SDAR", "Dream", "FastDLLMv2", "Family", "LLaDA", "Specials", "detect"]
