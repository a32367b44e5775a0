"""Tiny random public checkpoints in the real layouts (tests/test_public_*.py, bench/).

Each family's fixture writes what the public repositories hold: the real config.json keys, the
real tensor names, two safetensors shards + model.safetensors.index.json, a small byte-level BPE
`tokenizer.json` trained here (with the family's special tokens: MASK, EOS, chat markers),
`tokenizer_config.json` with a chat template. Nothing is downloaded. `reference_model` builds the
matching `transformers` model (LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM) on the same
weights: a faithful reference once it is given the family's attention mask as a float 4D mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b):\n    return a + b\n",
    "rain falls on the quiet town and the river runs",
    "for i in range(10):\n    print(i * i)\n",
    "a haiku about rain: soft drops on the roof, the garden drinks",
    "hello world, this is a small tokenizer for tests",
] * 4

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

FAMILIES = ("llada", "dream", "fast_dllm_v2", "sdar")

SPECIALS = {
    "llada": ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
              "<|end_header_id|>", "<|eot_id|>"],
    "dream": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"],
    "fast_dllm_v2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "|<MASK>|"],
    "sdar": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"],
}  # fmt: skip


def train_tokenizer(directory: Path, family: str) -> dict[str, int]:
    """A byte-level BPE tokenizer.json trained on CORPUS with the family's special tokens; returns
    token -> id of the specials."""
    from unmask.tokenizers.hf import hf_tokenizers

    hf = hf_tokenizers()
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS[family],
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in SPECIALS[family]}


def _shapes(family: str, cfg: dict, V: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    if family == "llada":
        d, L, H, KV = cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"]
        hd, F = d // H, cfg["mlp_hidden_size"]
        out["model.transformer.wte.weight"] = (V, d)
        out["model.transformer.ln_f.weight"] = (d,)
        out["model.transformer.ff_out.weight"] = (V, d)
        for i in range(L):
            p = f"model.transformer.blocks.{i}."
            out.update({p + "attn_norm.weight": (d,), p + "ff_norm.weight": (d,),
                        p + "q_proj.weight": (H * hd, d), p + "k_proj.weight": (KV * hd, d),
                        p + "v_proj.weight": (KV * hd, d), p + "attn_out.weight": (d, H * hd),
                        p + "ff_proj.weight": (F, d), p + "up_proj.weight": (F, d),
                        p + "ff_out.weight": (d, F)})  # fmt: skip
        return out
    d, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, F = cfg.get("head_dim") or d // H, cfg["intermediate_size"]
    out["model.embed_tokens.weight"] = (V, d)
    out["model.norm.weight"] = (d,)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, d)
    for i in range(L):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                    p + "self_attn.q_proj.weight": (H * hd, d),
                    p + "self_attn.k_proj.weight": (KV * hd, d),
                    p + "self_attn.v_proj.weight": (KV * hd, d),
                    p + "self_attn.o_proj.weight": (d, H * hd),
                    p + "mlp.gate_proj.weight": (F, d), p + "mlp.up_proj.weight": (F, d),
                    p + "mlp.down_proj.weight": (d, F)})  # fmt: skip
        if family in ("dream", "fast_dllm_v2"):
            out.update({p + f"self_attn.{x}_proj.bias": (n * hd,)
                        for x, n in (("q", H), ("k", KV), ("v", KV))})  # fmt: skip
        if family == "sdar":
            out[p + "self_attn.q_norm.weight"] = (hd,)
            out[p + "self_attn.k_norm.weight"] = (hd,)
    return out


def family_config(family: str, ids: dict[str, int], V: int) -> dict:
    if family == "llada":
        eos = ids["<|endoftext|>"]
        return {
            "architectures": ["LLaDAModelLM"], "model_type": "llada",
            "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                         "AutoModel": "modeling_llada.LLaDAModelLM"},
            "activation_type": "silu", "block_type": "llama", "layer_norm_type": "rms",
            "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_ratio": 4,
            "mlp_hidden_size": 96, "max_sequence_length": 256, "rope": True,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "weight_tying": False,
            "include_bias": False, "include_qkv_bias": False, "vocab_size": V,
            "embedding_size": V, "mask_token_id": ids["<|mdm_mask|>"], "eos_token_id": eos,
            "pad_token_id": eos, "torch_dtype": "float32", "use_cache": False,
        }  # fmt: skip
    base = {
        "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
        "attention_dropout": 0.0, "vocab_size": V, "torch_dtype": "float32",
    }  # fmt: skip
    if family == "dream":
        eos = ids["<|endoftext|>"]
        return {**base, "architectures": ["DreamModel"], "model_type": "Dream",
                "auto_map": {"AutoModel": "modeling_dream.DreamModel"},
                "tie_word_embeddings": False, "mask_token_id": ids["<|mask|>"],
                "pad_token_id": eos, "bos_token_id": eos, "eos_token_id": eos}  # fmt: skip
    if family == "fast_dllm_v2":
        return {**base, "architectures": ["Fast_dLLM_QwenForCausalLM"],
                "model_type": "Fast_dLLM_Qwen", "bd_size": 4, "tie_word_embeddings": False,
                "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}  # fmt: skip
    return {**base, "architectures": ["SDARForCausalLM"], "model_type": "sdar",
            "auto_map": {"AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
            "hidden_size": 48, "head_dim": 16, "block_size": 4, "attention_bias": False,
            "tie_word_embeddings": True, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}  # fmt: skip


def write_checkpoint(
    directory: str | Path,
    family: str,
    seed: int = 0,
    overrides: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A tiny random checkpoint of `family` in its real layout (two shards + index).
    `overrides` replaces config.json keys (e.g. a ~1B shape for the benchmark); `dtype` is the
    stored weights' dtype."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = train_tokenizer(directory, family)
    from unmask.tokenizers.hf import hf_tokenizers

    V = hf_tokenizers().Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    V = -(-V // 16) * 16  # the embedding is padded past the tokenizer, as in the real ones
    if overrides and "vocab_size" in overrides:  # a larger embedding, as a real model has
        V = max(V, int(overrides["vocab_size"]))
        overrides = {**overrides, "vocab_size": V}
        if family == "llada":
            overrides["embedding_size"] = V
    cfg = {**family_config(family, ids, V), **(overrides or {})}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    chat = LLAMA3 if family == "llada" else CHATML
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat,
        "bos_token": "<|startoftext|>" if family == "llada" else None,
        "eos_token": {"llada": "<|endoftext|>", "dream": "<|endoftext|>"}.get(family, "<|im_end|>"),
        "pad_token": "<|endoftext|>",
        "mask_token": SPECIALS[family][-1] if family != "llada" else "<|mdm_mask|>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in _shapes(family, cfg, V).items():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            tensors[name] = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        else:
            scale = 0.1 if max(shape) <= 512 else 0.02  # keeps large random models finite
            tensors[name] = (scale * torch.randn(shape, generator=g)).to(dtype)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}  # fmt: skip
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(directory / shard),
                  metadata={"format": "pt"})  # fmt: skip
        weight_map.update(dict.fromkeys(keys, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


# ---- the transformers reference -------------------------------------------------------------

LLADA_TO_LLAMA = {
    "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}  # fmt: skip


def reference_model(directory: str | Path) -> torch.nn.Module:
    """The transformers model with the checkpoint's weights (fp32, eager attention)."""
    import transformers
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    arch = cfg["architectures"][0]
    if arch == "LLaDAModelLM":
        config = transformers.LlamaConfig(
            vocab_size=cfg["embedding_size"], hidden_size=cfg["d_model"],
            intermediate_size=cfg["mlp_hidden_size"], num_hidden_layers=cfg["n_layers"],
            num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg["n_kv_heads"],
            max_position_embeddings=cfg["max_sequence_length"], rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=cfg["rope_theta"], tie_word_embeddings=False, attention_bias=False,
        )  # fmt: skip
        renamed = {}
        for name, t in state.items():
            if name == "model.transformer.wte.weight":
                renamed["model.embed_tokens.weight"] = t
            elif name == "model.transformer.ln_f.weight":
                renamed["model.norm.weight"] = t
            elif name == "model.transformer.ff_out.weight":
                renamed["lm_head.weight"] = t
            else:
                _, _, _, i, part, _ = name.split(".")
                renamed[f"model.layers.{i}.{LLADA_TO_LLAMA[part]}.weight"] = t
        state, cls = renamed, transformers.LlamaForCausalLM
    else:
        qwen3 = arch == "SDARForCausalLM"
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "rms_norm_eps", "rope_theta", "tie_word_embeddings")  # fmt: skip
        kwargs = {k: cfg[k] for k in keys}
        if qwen3:
            kwargs.update(head_dim=cfg["head_dim"], attention_bias=cfg["attention_bias"])
            config, cls = transformers.Qwen3Config(**kwargs), transformers.Qwen3ForCausalLM
        else:
            config, cls = transformers.Qwen2Config(**kwargs), transformers.Qwen2ForCausalLM
    config._attn_implementation = "eager"
    model = cls(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or (config.tie_word_embeddings and m == "lm_head.weight")
               for m in missing), missing  # fmt: skip
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def float_mask(allowed: torch.Tensor) -> torch.Tensor:
    """bool [B, T, S] (True = may attend) -> the additive float mask [B, 1, T, S]."""
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask[~allowed] = torch.finfo(torch.float32).min
    return mask[:, None]


def block_causal(T: int, block: int) -> torch.Tensor:
    blk = torch.arange(T) // block
    return blk[None, :] <= blk[:, None]  # [T query, T key]


def reference_logits(
    ref: torch.nn.Module, ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Logits of the transformers model for ids [B, T] under `allowed` [B, T, T]."""
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=float_mask(allowed), position_ids=positions)
    return out.logits.float()
