"""The denoiser: a pre-norm Transformer (RoPE, RMSNorm, SwiGLU, tied embeddings) over the unified
vocabulary.

The attention pattern is a config (`attention`):
  * "full": every position attends to every real position — the masked-diffusion denoiser (MDLM,
    LLaDA). There is no time / noise-level input: the number of MASK tokens tells the network how
    noisy the canvas is.
  * "causal": the autoregressive baseline (logits at position i predict token i + 1); the legacy
    flag `causal=True` means the same.
  * "block_causal" with `block_size`: positions are grouped into blocks of `block_size` by their
    absolute (RoPE) position; a token sees its own block both ways and every earlier block
    (BD3-LM, SDAR, Fast-dLLM v2). Committed blocks then have an exact KV cache.
`token_shift=True` (a block-diffusion model converted from the AR one, as Fast-dLLM v2): the
logit at position i predicts the token at i + 1, so the AR head is reused; samplers and
objectives read a position's prediction from the position before it.
`output_shift=True` (Dream, DiffuCoder: full attention, converted from an AR model): the same fact
handled here instead, as those models' own code does: the network returns, at position i, the
logits computed from the output at i - 1 (position 0 keeps its own), so a sampler reads position i
as usual. It needs the whole canvas in every forward (no KV cache).

Public checkpoints (LLaDA, Qwen2/Dream, Qwen3/SDAR; models/families/) load onto this same network:
grouped-query attention (`n_kv_heads`; the KV cache holds the KV heads only), an explicit
`head_size`, optional q/k/v bias (`qkv_bias`), per-head RMSNorm of queries and keys (`qk_norm`)
and an untied output head (`tie_embeddings=False`).

Two kinds of "not a token" must not be confused:
  * MASK is a vocabulary token (the absorbing state). It is attended to like any other token and
    its logit is forced to -inf, so it is never predicted.
  * `pad_mask` False marks *batching* padding: positions that exist only because rows of different
    lengths share a tensor. Their keys are never attended to, so a real row's logits do not depend
    on them. The PAD token written after EOS is a real token in this sense (see models/data.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmask.errors import InvalidArgument

ATTENTION_PATTERNS = ("full", "causal", "block_causal")


@dataclass
class ModelConfig:
    vocab_size: int  # size of the unified vocabulary (specials + BPE + MIDI)
    d_model: int = 256  # width of the residual stream
    n_layers: int = 6  # number of Transformer blocks
    n_heads: int = 4  # attention heads; head dim = d_model // n_heads (must be even for RoPE)
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None -> n_heads
    head_size: int | None = None  # explicit head dim (Qwen3); None -> d_model // n_heads
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    tie_embeddings: bool = True  # output head = input embedding matrix
    mlp_hidden: int | None = None  # SwiGLU hidden width; None -> 8/3 * d_model rounded up to 64
    max_seq_len: int = 512  # longest canvas: RoPE angles exist for positions 0..max_seq_len-1
    rope_theta: float = 10000.0  # RoPE base frequency
    dropout: float = 0.0  # on attention weights, residual branches and embeddings (training only)
    causal: bool = False  # legacy spelling of attention="causal" (kept for old checkpoints)
    attention: str = "full"  # "full" | "causal" | "block_causal" (see the module docstring)
    block_size: int = 1  # block_causal: positions per block (blocks start at position 0)
    token_shift: bool = False  # the logit at i predicts token i + 1 (AR head reused)
    output_shift: bool = False  # the network itself returns at i the logits of output i - 1
    norm_eps: float = 1e-6  # RMSNorm epsilon
    mask_id: int | None = None  # the MASK token: its logit is set to -inf (never a prediction)

    def __post_init__(self) -> None:
        if self.causal or self.attention == "causal":  # one fact, two spellings
            self.causal, self.attention = True, "causal"
        if self.mlp_hidden is None:
            # SwiGLU has three matrices instead of two: 8/3 * d keeps the parameter count of a 4*d MLP
            self.mlp_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_size is None:
            heads_ok = self.n_heads > 0 and self.d_model % (2 * self.n_heads) == 0  # even head dim
        else:
            heads_ok = self.n_heads > 0 and self.head_size > 0 and self.head_size % 2 == 0
        checks = {
            "vocab_size": self.vocab_size > 0,
            "d_model": self.d_model > 0,
            "n_layers": self.n_layers > 0,
            "n_heads": heads_ok,
            "n_kv_heads": self.n_kv_heads > 0 and heads_ok and self.n_heads % self.n_kv_heads == 0,
            "output_shift": not (self.output_shift and self.token_shift),
            "mlp_hidden": self.mlp_hidden > 0,
            "max_seq_len": self.max_seq_len > 0,
            "rope_theta": self.rope_theta > 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "norm_eps": self.norm_eps > 0,
            "mask_id": self.mask_id is None or 0 <= self.mask_id < self.vocab_size,
            "attention": self.attention in ATTENTION_PATTERNS,
            "block_size": self.block_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                hint = {
                    "n_heads": " (d_model must split into heads of even size)",
                    "n_kv_heads": " (must divide n_heads)",
                    "output_shift": " (the shift is either the network's or the sampler's)",
                }.get(name, "")
                raise InvalidArgument(
                    f"invalid model setting {name}={getattr(self, name)!r}{hint}",
                    field=name,
                    value=getattr(self, name),
                )

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgument(f"unknown model settings: {', '.join(unknown)}", field="model")
        return cls(**d)


@dataclass
class KVCache:
    """Keys and values of earlier positions, reused by later forward passes.

    Used for autoregressive decoding and for the diffusion *prefix cache* (the prompt and finished
    blocks are encoded once; the active block and the rest of the canvas then attend to them).
    The storage order of positions does not matter except through `pad_mask`: RoPE is applied
    before caching, so every key already carries its own position.
    """

    layers: list[tuple[Tensor, Tensor]]  # per block: (keys, values), each [B, n_kv_heads, P, hd]
    pad_mask: Tensor  # [B, P] bool; True = real position, False = batching padding (never attended)
    # > 0: each layer's tensors are the first P positions of buffers `room` positions longer
    # (the Engine's batched past, models/sampler.py CacheCollator): a forward writes its window's
    # keys and values there instead of copying the past into a new tensor. The cache it returns
    # then shares that buffer, which the next forward overwrites: copy what you keep of it.
    room: int = 0

    @property
    def length(self) -> int:
        return self.pad_mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.pad_mask.shape[0]

    def select(self, rows: Tensor | list[int] | slice) -> KVCache:
        """Keep some rows (e.g. drop the jobs of a batch that have finished)."""
        if isinstance(rows, list):
            rows = torch.tensor(rows, dtype=torch.long, device=self.pad_mask.device)
        return KVCache([(k[rows], v[rows]) for k, v in self.layers], self.pad_mask[rows])

    def truncate(self, length: int) -> KVCache:
        """Keep the first `length` cached positions (e.g. drop a block that will be recomputed)."""
        if not 0 <= length <= self.length:
            raise InvalidArgument(
                f"cannot truncate a cache of {self.length} positions to {length}",
                field="length",
                value=length,
            )
        layers = [(k[:, :, :length], v[:, :, :length]) for k, v in self.layers]
        return KVCache(layers, self.pad_mask[:, :length])


@dataclass(frozen=True)
class Packing:
    """The real tokens of a padded batch, packed: rows of different widths (the Engine's jobs)
    are right-padded to [B, T] for attention, but the position-wise layers (norms, projections,
    MLP: most of the FLOPs) run on the N real tokens only. At 32 jobs whose windows are 4 or 8
    wide, most steps padded every window to 8: 104 of 256 matmul rows were padding."""

    rows: Tensor  # LongTensor [N]: flat indices b * T + t of the real tokens
    B: int
    T: int

    @classmethod
    def of(cls, pad_mask: Tensor | None) -> Packing | None:
        """None when there is no padding, or off the CPU (a GPU hardly pays for padded rows,
        and finding them would synchronise every forward)."""
        if pad_mask is None or pad_mask.device.type != "cpu" or bool(pad_mask.all()):
            return None
        B, T = pad_mask.shape
        return cls(pad_mask.flatten().nonzero().flatten(), B, T)

    def pack(self, x: Tensor) -> Tensor:
        """[B, T, ...] -> [N, ...]."""
        return x.reshape(self.B * self.T, *x.shape[2:])[self.rows]

    def unpack(self, x: Tensor) -> Tensor:
        """[N, ...] -> [B, T, ...], zeros at the padding."""
        out = x.new_zeros(self.B * self.T, *x.shape[1:])
        out[self.rows] = x
        return out.view(self.B, self.T, *x.shape[1:])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32: under bf16 autocast the mean of squares loses too much precision
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


class Rotary(nn.Module):
    """RoPE angle table for positions 0..max_seq_len-1, looked up per (row, position)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        # not persistent: derived from the config, so it is never stored in a checkpoint
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # [L, head_dim/2]
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        # positions [B, T] -> cos, sin [B, 1, T, head_dim/2] (broadcast over heads)
        return self.cos[positions][:, None], self.sin[positions][:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of each head by the position's angles. x: [B, H, T, hd]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def append_positions(past: Tensor, new: Tensor, room: int = 0) -> Tensor:
    """past [B, KV, P, hd] ++ new [B, KV, T, hd] along the positions. With `room` >= T (past is
    the head of a longer buffer: `KVCache.room`) new is written into the buffer and the result
    is a view of it, without copying the past (megabytes per layer for 32 batched jobs)."""
    T = new.shape[2]
    if room < T or past.dtype != new.dtype:
        return torch.cat([past.to(new.dtype), new], dim=2)
    B, H, P, D = past.shape
    out = past.as_strided((B, H, P + T, D), past.stride(), past.storage_offset())
    out[:, :, P:] = new
    return out


class SelfAttention(nn.Module):
    """Multi-head attention; grouped-query when n_kv_heads < n_heads (each KV head serves
    n_heads / n_kv_heads query heads, and the cache stores the KV heads only)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.n_kv_heads = int(config.n_kv_heads or config.n_heads)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.qkv = nn.Linear(config.d_model, q_dim + 2 * kv_dim, bias=config.qkv_bias)
        self.out = nn.Linear(q_dim, config.d_model, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        past_kv: tuple[Tensor, Tensor] | None,
        packing: Packing | None = None,
        room: int = 0,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        qkv = self.qkv(x)  # [B, T, q + 2 kv], or packed [N, q + 2 kv]
        if packing is not None:
            qkv = packing.unpack(qkv)  # attention needs the [B, T] layout; padding is 0
        B, T, _ = qkv.shape
        q, k, v = qkv.split(self.split, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # per-head RMSNorm (Qwen3), before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd], [B, KV, T, hd]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_kv is not None:
            k = append_positions(past_kv[0], k, room)  # [B, KV, P + T, hd]
            v = append_positions(past_kv[1], v, room)
        k_all, v_all = k, v
        if self.n_kv_heads != self.n_heads:  # query head h reads KV head h // group
            group = self.n_heads // self.n_kv_heads
            k_all, v_all = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k_all,
            v_all,
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # re-assemble heads: [B, T, H * hd]
        if packing is not None:
            y = packing.pack(y)  # [N, H * hd]
        return self.resid_dropout(self.out(y)), (k, v)  # the cache keeps the KV heads only


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [B, T, hidden] each
        return self.dropout(self.down(F.silu(gate) * up))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        self.attn = SelfAttention(config)
        self.norm2 = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        is_causal: bool,
        past_kv: tuple[Tensor, Tensor] | None,
        packing: Packing | None = None,
        room: int = 0,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # x [B, T, d], or packed [N, d]: the norms, projections and MLP are position-wise
        a, kv = self.attn(self.norm1(x), cos, sin, mask, is_causal, past_kv, packing, room)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, kv


class Denoiser(nn.Module):
    """Maps a (partly masked) canvas of token ids to logits over the vocabulary at every position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.rope = Rotary(config.head_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # tied input/output embeddings
        self.register_buffer("banned", self._banned(), persistent=False)  # [V] logits -> -inf

        if self.tok_emb.weight.is_meta:  # built to be loaded into (models/hf_checkpoint.py)
            return
        self.apply(self._init_weights)
        # GPT-2 style: shrink the projections that write into the residual stream with depth
        for name, p in self.named_parameters():
            if name.endswith("attn.out.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    def _banned(self, device: torch.device | str | None = None) -> Tensor:
        banned = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=device)
        if self.config.mask_id is not None:
            banned[self.config.mask_id] = True
        return banned

    def materialize_buffers(self, device: torch.device | str) -> Denoiser:
        """Rebuild the derived (never stored) buffers on `device` and re-tie the head: for a
        model built on the meta device whose weights were then assigned tensor by tensor
        (models/hf_checkpoint.py), so the weights exist once, on their device."""
        c = self.config
        self.rope = Rotary(c.head_dim, c.max_seq_len, c.rope_theta).to(device)
        self.banned = self._banned(device)
        if c.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        return self

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; the tied embedding matrix is counted once."""
        n = sum(p.numel() for p in self.parameters())
        if not exclude_embeddings:
            return n
        untied = 0 if self.config.tie_embeddings else self.head.weight.numel()
        return n - self.tok_emb.weight.numel() - untied

    def describe(self) -> str:
        c = self.config
        kind = {
            "causal": "autoregressive baseline",
            "full": "bidirectional masked-diffusion denoiser",
            "block_causal": f"block-diffusion denoiser, block-causal attention, block {c.block_size}",
        }[c.attention] + (", token shift" if c.token_shift else "")
        kv = f", {c.n_kv_heads} KV heads" if c.n_kv_heads != c.n_heads else ""
        extras = "".join(
            f", {name}" for name, on in (("q/k/v bias", c.qkv_bias), ("q/k norm", c.qk_norm),
                                         ("output shift", c.output_shift)) if on
        )  # fmt: skip
        return (
            f"Denoiser ({kind}): {self.num_parameters() / 1e6:.2f}M parameters "
            f"({self.num_parameters(exclude_embeddings=True) / 1e6:.2f}M without embeddings)\n"
            f"  vocab {c.vocab_size}, d_model {c.d_model}, {c.n_layers} layers x {c.n_heads} heads "
            f"(head dim {c.head_dim}{kv}), SwiGLU hidden {c.mlp_hidden}{extras}\n"
            f"  max_seq_len {c.max_seq_len}, RoPE theta {c.rope_theta:g}, dropout {c.dropout:g}, "
            f"{'tied' if c.tie_embeddings else 'untied'} embeddings, mask_id {c.mask_id}"
        )

    def forward(
        self,
        ids: Tensor,
        pad_mask: Tensor | None = None,
        *,
        start_pos: int | Tensor = 0,
        past: KVCache | None = None,
        use_cache: bool = False,
        out_index: Tensor | None = None,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """ids [B, T] -> logits [B, T, V] (fp32, or bf16 under autocast), and optionally a cache.

        pad_mask [B, T]: True = real token, False = batching padding (None: all real).
        start_pos: RoPE position of ids[:, 0], one int or a LongTensor [B] (one per row).
        past: cache of earlier positions; the new tokens attend to all its real positions and to
            themselves (causally among themselves when config.causal).
        use_cache: also return a KVCache holding past + the new positions.
        out_index: LongTensor [B, K] of window offsets: return logits [B, K, V] for those only.
            The vocabulary projection is the largest matmul of this model; a sampler needs
            logits for the current block only, not for the whole canvas.
        positions: explicit RoPE positions [B, T] (or [T]) for layouts that are not one canvas in
            order: with `attn_mask` (a bool mask [T, T] or [B, 1, T, T], True = may attend; no
            past) for the block-diffusion training pass over noisy + clean copies; without it for
            a reordered canvas, where `start_pos` then counts slots (blocks, cache order).
        """
        B, T = ids.shape
        if past is not None and past.batch_size != B:
            raise InvalidArgument(
                f"cache holds {past.batch_size} rows but the batch has {B}", field="past", value=B
            )
        if pad_mask is not None and (pad_mask.shape != ids.shape or pad_mask.dtype != torch.bool):
            raise InvalidArgument(
                "pad_mask must be a bool tensor of the same shape as ids",
                field="pad_mask",
                value=tuple(pad_mask.shape),
            )
        if attn_mask is not None:
            if positions is None or past is not None:
                raise InvalidArgument(
                    "an explicit attn_mask needs positions and no past", field="attn_mask"
                )
            pos = positions.expand(B, T) if positions.dim() == 1 else positions
            mask, is_causal = (attn_mask if attn_mask.dim() == 4 else attn_mask[None, None]), False
        elif positions is not None:
            # a reordered canvas (infill order): `start_pos` counts slots, which set the block
            # structure and the cache order; `positions` are the true (RoPE) positions
            start = torch.as_tensor(start_pos, device=ids.device).reshape(-1, 1)
            slots = start + torch.arange(T, device=ids.device)[None, :]
            pos = positions.expand(B, T) if positions.dim() == 1 else positions
            real = pos[pad_mask] if pad_mask is not None else pos
            if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.config.max_seq_len):
                raise InvalidArgument(
                    f"positions outside the model's range 0..{self.config.max_seq_len - 1}",
                    field="positions",
                    value=int(real.max()),
                )
            pos = pos.clamp(0, self.config.max_seq_len - 1)
            mask, is_causal = self._attention_mask(pad_mask, past, slots.expand(B, T))
        else:
            pos = self._positions(start_pos, B, T, ids.device, pad_mask)
            mask, is_causal = self._attention_mask(pad_mask, past, pos)
        cos, sin = self.rope(pos)

        if self.config.output_shift and past is not None:
            raise InvalidArgument(
                "this model's logits are shifted by one inside the network (Dream-style); it "
                "needs the whole canvas in every forward pass: use_cache must be 'none'",
                field="use_cache",
            )
        x = self.drop(self.tok_emb(ids))  # [B, T, d]
        packing = Packing.of(pad_mask)
        if packing is not None:
            x = packing.pack(x)  # [N, d]: the real tokens only
        new_layers = []
        room = past.room if past is not None else 0
        for i, block in enumerate(self.blocks):
            layer_past = past.layers[i] if past is not None else None
            x, kv = block(x, cos, sin, mask, is_causal, layer_past, packing, room)
            new_layers.append(kv)
        if packing is not None:
            x = packing.unpack(x)  # [B, T, d]
        if self.config.output_shift:  # position i reads the output at i - 1 (0 keeps its own)
            x = torch.cat([x[:, :1], x[:, :-1]], dim=1)
        if out_index is not None:
            x = x.gather(1, out_index[:, :, None].expand(-1, -1, x.shape[-1]))  # [B, K, d]
        logits = self.head(self.norm(x))  # [B, T or K, V]
        if self.config.mask_id is not None:
            logits = logits.masked_fill(self.banned, float("-inf"))

        cache = None
        if use_cache:
            new_pad = pad_mask if pad_mask is not None else ids.new_ones(B, T, dtype=torch.bool)
            pad = torch.cat([past.pad_mask, new_pad], dim=1) if past is not None else new_pad
            cache = KVCache(new_layers, pad)
        return logits, cache

    def logits(self, ids: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """Logits of a full forward pass, without a cache."""
        return self(ids, pad_mask)[0]

    def _positions(
        self,
        start_pos: int | Tensor,
        B: int,
        T: int,
        device: torch.device,
        pad_mask: Tensor | None = None,
    ) -> Tensor:
        offsets = torch.arange(T, device=device)
        if isinstance(start_pos, Tensor):
            start = start_pos.to(device=device, dtype=torch.long).reshape(-1)
            if start.numel() != B:
                raise InvalidArgument(
                    f"start_pos has {start.numel()} entries for {B} rows", field="start_pos"
                )
            positions = start[:, None] + offsets[None, :]  # [B, T]
            if pad_mask is not None:
                # only real tokens must fit: a batch row's padding tail may run past the end
                real = positions[pad_mask]
                lo = int(real.min()) if real.numel() else 0
                last = int(real.max()) if real.numel() else 0
                if lo < 0 or last >= self.config.max_seq_len:
                    raise InvalidArgument(
                        f"positions {lo}..{last} outside the model's range "
                        f"0..{self.config.max_seq_len - 1}",
                        field="start_pos",
                        value=last,
                    )
                return positions.clamp(0, self.config.max_seq_len - 1)
            lo, hi = int(start.min()), int(start.max())
        else:
            lo = hi = int(start_pos)
            positions = (offsets + lo)[None, :].expand(B, T)
        if lo < 0 or hi + T > self.config.max_seq_len:
            raise InvalidArgument(
                f"positions {lo}..{hi + T - 1} outside the model's range "
                f"0..{self.config.max_seq_len - 1}",
                field="start_pos",
                value=hi,
            )
        return positions

    def _attention_mask(
        self, pad_mask: Tensor | None, past: KVCache | None, positions: Tensor
    ) -> tuple[Tensor | None, bool]:
        """Boolean mask [B, 1, T, P + T] (True = may attend), or None with SDPA's causal flag.

        A past (cache) is always earlier text: every real cached key is visible (for block_causal
        the cache holds whole earlier blocks only; the samplers keep it so)."""
        B, T = positions.shape
        device = positions.device
        pattern = self.config.attention
        if past is None and pad_mask is None and pattern != "block_causal":
            return None, pattern == "causal"  # fast path: full (or plain causal), fused kernels
        keys = (
            pad_mask if pad_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
        )
        allowed = keys[:, None, :].expand(B, T, T)  # [B, T query, T key]
        if pattern == "causal":
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=device).tril()
        elif pattern == "block_causal":
            blk = positions // self.config.block_size  # [B, T] block of each position
            allowed = allowed & (blk[:, None, :] <= blk[:, :, None])  # key block <= query block
        # each query may always see itself: a padding query row then has one key and stays finite,
        # while a real row is unchanged (it sees itself anyway)
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)
        if past is not None:
            old = past.pad_mask.to(device)[:, None, :].expand(B, T, past.length)
            allowed = torch.cat([old, allowed], dim=2)  # [B, T, P + T]
        return allowed[:, None], False
