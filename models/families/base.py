"""What a family adapter says about a public checkpoint, and the parts the families share.

An adapter reads a checkpoint's `config.json` (and its tokenizer) and answers: the backbone
config of our one network (models/network.py), which checkpoint tensors make each of our
parameters (q/k/v and gate/up are fused here: one tensor is the concatenation of several), the
special ids, where the one-position logit shift happens, the attention pattern and block size,
which cache modes are exact, and the sampler defaults that suit it. Adapters hold no weights and
import no modeling code: the facts come from the public modeling files, read, never executed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from unmask.errors import CheckpointError
from unmask.models.network import ModelConfig

# RoPE angle tables are built for this many positions at most: public configs announce up to
# 131072, far beyond what a diffusion canvas uses; 32768 keeps the table at a few MB per model.
MAX_POSITIONS = 32768


@dataclass(frozen=True)
class Specials:
    mask_id: int  # the absorbing state
    eos_id: int  # ends a generation
    pad_id: int  # what the sampler writes after EOS; never a prediction (distinct from EOS)
    bos_id: int | None


def first_id(value: Any) -> int | None:
    """config.json writes an id as an int, a list of ints (several EOS ids) or null."""
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def require(cfg: dict, key: str, family: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise CheckpointError(f"config.json of this {family} checkpoint has no {key!r}", field=key)
    return cfg[key]


class Family:
    """Base adapter: Qwen2-style tensor names (most families), overridden where they differ."""

    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    # tokens that name the MASK in the families' tokenizers, and the documented fallback id
    mask_tokens: ClassVar[tuple[str, ...]] = ()
    mask_fallback: ClassVar[int | None] = None
    add_bos: ClassVar[bool] = False  # a plain prompt starts with BOS (chat templates add their own)

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg

    # ---- shape -----------------------------------------------------------------------------
    def backbone(self, vocab_size: int, mask_id: int) -> ModelConfig:
        raise NotImplementedError

    def attention(self) -> tuple[str, int]:
        """("full", 1) or ("block_causal", block size)."""
        return "full", 1

    def trained_block(self, key: str, default: int) -> int:
        """The block size a block-causal checkpoint was trained with (config.json `key`)."""
        value = self.cfg.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(
                f"config.json {key} must be a positive integer (the trained block size), "
                f"not {value!r}",
                field="block_size",
                value=value,
            )
        return value

    def shift(self) -> str:
        """ "none"; "sampler" (token_shift: the block sampler reads i - 1); "network"
        (output_shift: the network returns position i's logits from output i - 1)."""
        return "none"

    def cache_modes(self) -> dict[str, str]:
        """use_cache value -> "exact" | "approximate" for the modes this family allows."""
        pattern, _ = self.attention()
        if pattern == "block_causal":
            return {"none": "exact", "prefix": "exact"}
        if self.shift() == "network":
            return {"none": "exact"}
        return {"none": "exact", "prefix": "approximate", "dual": "approximate"}

    def default_block_length(self) -> int:
        pattern, block = self.attention()
        return block if pattern == "block_causal" else 32

    def sampler_defaults(self) -> dict[str, Any]:
        """Per-modality sampler defaults (config.json `sampler_defaults` of our own models)."""
        d: dict[str, Any] = {"use_cache": "prefix" if "prefix" in self.cache_modes() else "none"}
        if self.attention()[0] != "block_causal":
            d["block_length"] = self.default_block_length()
        return {"text": d, "code": dict(d)}

    # ---- tensors ---------------------------------------------------------------------------
    def layer_names(self, i: int) -> dict[str, tuple[str, ...]]:
        p = f"model.layers.{i}."
        return {
            "norm1.weight": (p + "input_layernorm.weight",),
            "attn.qkv.weight": tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"),
            "attn.qkv.bias": tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv"),
            "attn.out.weight": (p + "self_attn.o_proj.weight",),
            "attn.q_norm.weight": (p + "self_attn.q_norm.weight",),
            "attn.k_norm.weight": (p + "self_attn.k_norm.weight",),
            "norm2.weight": (p + "post_attention_layernorm.weight",),
            "mlp.gate_up.weight": (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            "mlp.down.weight": (p + "mlp.down_proj.weight",),
        }

    def top_names(self, tied: bool) -> dict[str, tuple[str, ...]]:
        emb = ("model.embed_tokens.weight",)
        return {"tok_emb.weight": emb, "norm.weight": ("model.norm.weight",),
                "head.weight": emb if tied else ("lm_head.weight",)}  # fmt: skip

    def tensor_map(self, targets: list[str], tied: bool) -> dict[str, tuple[str, ...]]:
        """Our parameter name -> the checkpoint tensors concatenated (dim 0) to make it."""
        out: dict[str, tuple[str, ...]] = {}
        top = self.top_names(tied)
        for name in targets:
            if name.startswith("blocks."):
                _, idx, rest = name.split(".", 2)
                out[name] = self.layer_names(int(idx))[rest]
            else:
                out[name] = top[name]
        return out

    # ---- helpers for Qwen-style configs ------------------------------------------------------
    def check_common(self) -> None:
        cfg = self.cfg
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(
                f"hidden_act {act!r} is not supported (silu only)", field="hidden_act"
            )
        scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
        kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if kind not in ("default", None):
            raise CheckpointError(f"RoPE scaling {kind!r} is not supported", field="rope_scaling")
        if cfg.get("use_sliding_window"):
            raise CheckpointError(
                "sliding-window attention is not supported", field="use_sliding_window"
            )

    def rope_theta(self, default: float = 10000.0) -> float:
        cfg = self.cfg
        theta = cfg.get("rope_theta")
        if theta is None:
            theta = (cfg.get("rope_parameters") or {}).get("rope_theta", default)
        return float(theta)

    def qwen_backbone(
        self, vocab_size: int, mask_id: int, *, qkv_bias: bool, qk_norm: bool
    ) -> ModelConfig:
        cfg, fam = self.cfg, self.name
        self.check_common()
        pattern, block = self.attention()
        shift = self.shift()
        n_heads = int(require(cfg, "num_attention_heads", fam))
        return ModelConfig(
            vocab_size=vocab_size,
            d_model=int(require(cfg, "hidden_size", fam)),
            n_layers=int(require(cfg, "num_hidden_layers", fam)),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_size=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            mlp_hidden=int(require(cfg, "intermediate_size", fam)),
            max_seq_len=min(
                int(cfg.get("max_position_embeddings") or MAX_POSITIONS), MAX_POSITIONS
            ),
            rope_theta=self.rope_theta(),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            attention=pattern,
            block_size=block,
            token_shift=shift == "sampler",
            output_shift=shift == "network",
            mask_id=mask_id,
        )
