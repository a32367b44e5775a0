"""SDAR 1.7B / 4B / 8B (JetAstra; `SDARForCausalLM`, model_type "sdar"): a Qwen3 backbone —
per-head RMSNorm of queries and keys before RoPE (`self_attn.{q,k}_norm`), grouped-query
attention, an explicit `head_dim`, no q/k/v bias unless `attention_bias` — trained as a block
diffusion model: block-causal attention over blocks of `block_size` (config.json), no logit
shift, exact prefix cache. MASK: the added token <|MASK|> (151669). Read from the public
`modeling_sdar.py` / `configuration_sdar.py`.
"""

from __future__ import annotations

from typing import ClassVar

from unmask.models.families.base import Family
from unmask.models.network import ModelConfig


class SDAR(Family):
    name = "sdar"
    architectures: ClassVar[tuple[str, ...]] = ("SDARForCausalLM",)
    model_types: ClassVar[tuple[str, ...]] = ("sdar",)
    mask_tokens: ClassVar[tuple[str, ...]] = ("<|MASK|>",)
    mask_fallback = 151669

    def attention(self) -> tuple[str, int]:
        return "block_causal", self.trained_block("block_size", 4)

    def backbone(self, vocab_size: int, mask_id: int) -> ModelConfig:
        bias = bool(self.cfg.get("attention_bias", False))
        return self.qwen_backbone(vocab_size, mask_id, qkv_bias=bias, qk_norm=True)
