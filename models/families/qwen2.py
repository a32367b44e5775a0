"""The Qwen2 family of diffusion LMs: Dream-v0 7B (DreamLM), DiffuCoder-7B (Apple),
Open-dCoder-0.5B, and Fast-dLLM v2 (NVlabs). Standard Qwen2 tensor names (`model.layers.N.
self_attn.{q,k,v,o}_proj`, with biases on q/k/v; `mlp.{gate,up,down}_proj`; `input_layernorm`,
`post_attention_layernorm`, `model.norm`, `lm_head` unless `tie_word_embeddings`), grouped-query
attention (`num_key_value_heads`). Read from the public `modeling_dream.py` and Fast-dLLM v2's
`modeling.py`:

- Dream / DiffuCoder / Open-dCoder (`DreamModel`, model_type "Dream"): full attention; the model
  was converted from an AR one and its generate code shifts the logits by one (position i reads
  the output at i - 1, position 0 its own) — done in our network (`output_shift`), so these run
  without a KV cache. MASK: `mask_token_id` (Dream 151666, the token <|mask|>).
- Fast-dLLM v2 (`Fast_dLLM_QwenForCausalLM`): block-causal attention over blocks of `bd_size`
  with the AR head reused (`token_shift`, handled by the block sampler with its exact cache).
  MASK: the added token |<MASK>| (151665).
"""

from __future__ import annotations

from typing import ClassVar

from unmask.models.families.base import Family
from unmask.models.network import ModelConfig


class Dream(Family):
    name = "dream"
    architectures: ClassVar[tuple[str, ...]] = ("DreamModel", "DreamForCausalLM")
    model_types: ClassVar[tuple[str, ...]] = ("Dream", "dream")
    mask_tokens: ClassVar[tuple[str, ...]] = ("<|mask|>",)
    mask_fallback = 151666

    def shift(self) -> str:
        return "network"

    def backbone(self, vocab_size: int, mask_id: int) -> ModelConfig:
        return self.qwen_backbone(vocab_size, mask_id, qkv_bias=True, qk_norm=False)


class FastDLLMv2(Dream):
    name = "fast_dllm_v2"
    architectures: ClassVar[tuple[str, ...]] = ("Fast_dLLM_QwenForCausalLM",)
    model_types: ClassVar[tuple[str, ...]] = ("Fast_dLLM_Qwen",)
    mask_tokens: ClassVar[tuple[str, ...]] = ("|<MASK>|",)
    mask_fallback = 151665

    def attention(self) -> tuple[str, int]:
        return "block_causal", self.trained_block("bd_size", 32)

    def shift(self) -> str:
        return "sampler"
