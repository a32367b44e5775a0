"""LLaDA-8B (Base / Instruct) and LLaDA-1.5 (GSAI-ML): a Llama-like masked-diffusion model with
OLMo-style names, read from the public `modeling_llada.py` / `configuration_llada.py`:

    model.transformer.wte.weight                       token embedding
    model.transformer.blocks.N.attn_norm.weight        RMSNorm before attention
    model.transformer.blocks.N.{q,k,v}_proj.weight     attention projections (no bias)
    model.transformer.blocks.N.attn_out.weight         attention output
    model.transformer.blocks.N.ff_norm.weight          RMSNorm before the MLP
    model.transformer.blocks.N.ff_proj.weight          SwiGLU gate (silu applied to it)
    model.transformer.blocks.N.up_proj.weight          SwiGLU up
    model.transformer.blocks.N.ff_out.weight           SwiGLU down
    model.transformer.ln_f.weight                      final RMSNorm
    model.transformer.ff_out.weight                    output head (untied: weight_tying false)

Full (bidirectional) attention, no logit shift, RoPE in the rotate-half layout, MASK 126336
(`mask_token_id`; the tokenizer calls it <|mdm_mask|>).
"""

from __future__ import annotations

from typing import ClassVar

from unmask.errors import CheckpointError
from unmask.models.families.base import MAX_POSITIONS, Family, require
from unmask.models.network import ModelConfig


class LLaDA(Family):
    name = "llada"
    architectures: ClassVar[tuple[str, ...]] = ("LLaDAModelLM",)
    model_types: ClassVar[tuple[str, ...]] = ("llada",)
    mask_tokens: ClassVar[tuple[str, ...]] = ("<|mdm_mask|>",)
    mask_fallback = 126336
    add_bos = True  # LLaDA's prompts start with <|startoftext|>

    def backbone(self, vocab_size: int, mask_id: int) -> ModelConfig:
        cfg = self.cfg
        for key, want in (("layer_norm_type", "rms"), ("activation_type", "silu"),
                          ("block_type", "llama")):  # fmt: skip
            if key in cfg and cfg[key] != want:
                raise CheckpointError(
                    f"{key} {cfg[key]!r} is not supported (LLaDA uses {want!r})", field=key
                )
        if cfg.get("include_bias") or cfg.get("include_qkv_bias"):
            raise CheckpointError(
                "LLaDA checkpoints with biases are not supported", field="include_bias"
            )
        n_heads = int(require(cfg, "n_heads", self.name))
        return ModelConfig(
            vocab_size=vocab_size,
            d_model=int(require(cfg, "d_model", self.name)),
            n_layers=int(require(cfg, "n_layers", self.name)),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("n_kv_heads") or n_heads),
            tie_embeddings=bool(cfg.get("weight_tying", False)),
            mlp_hidden=int(require(cfg, "mlp_hidden_size", self.name)),
            max_seq_len=min(int(cfg.get("max_sequence_length") or 4096), MAX_POSITIONS),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            mask_id=mask_id,
        )

    def layer_names(self, i: int) -> dict[str, tuple[str, ...]]:
        p = f"model.transformer.blocks.{i}."
        return {
            "norm1.weight": (p + "attn_norm.weight",),
            "attn.qkv.weight": (p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"),
            "attn.out.weight": (p + "attn_out.weight",),
            "norm2.weight": (p + "ff_norm.weight",),
            "mlp.gate_up.weight": (p + "ff_proj.weight", p + "up_proj.weight"),
            "mlp.down.weight": (p + "ff_out.weight",),
        }

    def top_names(self, tied: bool) -> dict[str, tuple[str, ...]]:
        wte = ("model.transformer.wte.weight",)
        return {"tok_emb.weight": wte, "norm.weight": ("model.transformer.ln_f.weight",),
                "head.weight": wte if tied else ("model.transformer.ff_out.weight",)}  # fmt: skip
