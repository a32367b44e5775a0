"""Training: the masked-diffusion denoiser (objective="diffusion") or the AR baseline ("ar").

Both objectives read the same batches (models/data.py), so at equal steps they have seen the same
tokens. The output directory is a model directory (models/checkpoint.py) plus

    train_state/state.pt   latest training state: weights, optimizer, step, tokens seen,
                           wall time, RNG states of the data sampler / masking / torch
    train_log.jsonl        one JSON line per log interval and per evaluation

Running `train` again with the same `out` resumes from train_state (raise max_steps to go on).

Optimisation: AdamW; weight decay on every matrix (linear layers and the tied embedding, as in
nanoGPT), none on the RMSNorm gains; linear warm-up then cosine decay to min_lr; gradient
clipping; gradient accumulation. bf16 autocast on CUDA, plain fp32 on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
import types
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

import torch
from tqdm import tqdm

from unmask.corpus.shards import load_split
from unmask.errors import CheckpointError, InvalidArgument, VocabMismatch
from unmask.models import checkpoint
from unmask.models.block_diffusion import (
    block_diffusion_loss,
    block_nelbo,
    block_order_nll,
    lengthen_gaps,
    reorder_for_infill,
)
from unmask.models.data import BatchSampler, SpecialIds, eval_batches
from unmask.models.network import Denoiser, ModelConfig
from unmask.models.objective import (
    ar_loss,
    ar_nll,
    build_maskable,
    diffusion_loss,
    mask_tokens,
    nelbo,
    sample_t,
)

STATE_FILE = Path("train_state") / "state.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    # paths
    corpus: str = "data/corpus"  # built corpus directory (train/ and val/ shards)
    vocab: str = ""  # vocabulary directory ("" = the vocabulary shipped with unmask)
    out: str = "runs/unmask"  # model directory to write; training state is kept inside it
    # model
    objective: str = "diffusion"  # "diffusion" (MDLM) | "block_diffusion" (BD3) | "ar" (baseline)
    init_from: str = ""  # model dir or train_state/state.pt whose weights start this run
    # block diffusion (objective="block_diffusion")
    block_size: int = 4  # final block size (the model's attention block)
    block_warmup: list[int] = field(default_factory=list)  # smaller sizes first, e.g. [1, 2]
    block_warmup_share: float = 0.1  # share of the steps spent on the warm-up sizes (split evenly)
    t_min: float = 0.45  # clipped mask-rate schedule for training, t ~ U[t_min, t_max] per block
    t_max: float = 0.95
    complementary: bool = False  # a second noisy copy with the complementary mask (Fast-dLLM v2)
    token_shift: bool = True  # the logit at i predicts token i + 1 (reuses an AR start's head)
    infill_reorder: float = 1.0  # share of infill rows trained in infill order (known text first)
    # share of text/code gaps (of rows in infill order) given extra slots ended by EOS, so the
    # model learns to end a [MASK:n] early (block diffusion; `lengthen_gaps`)
    infill_longer: float = 0.0
    # loss weight of an EOS that ends an infill gap (block diffusion): ~1 such target per gap,
    # against a prior learned from EOS only at a document's end, so unweighted it is learned
    # slowly (docs/model_experiments.md, stage 9b)
    span_end_weight: float = 1.0
    d_model: int = 256  # residual stream width
    n_layers: int = 6  # Transformer blocks
    n_heads: int = 4  # attention heads
    mlp_hidden: int | None = None  # SwiGLU hidden width (None: 8/3 * d_model, rounded to 64)
    dropout: float = 0.0  # dropout in training
    rope_theta: float = 10000.0  # RoPE base
    # data
    seq_len: int = 256  # canvas length (BOS + tag + content + EOS/PAD); the model's max_seq_len
    batch_size: int = 32  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    modality_weights: dict[str, float] = field(default_factory=dict)  # {} = equal, all present
    crop_share: float = 0.05  # rows cut to a random shorter length (ending at the document's end)
    prompt_share: float = 0.25  # rows whose random content prefix stays visible (diffusion only)
    infill_share: float = 0.15  # rows where only random spans are masked (diffusion only)
    eps: float = 1e-3  # smallest diffusion time t
    # optimisation
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 200  # linear warm-up from 0 to lr
    schedule: str = "cosine"  # "cosine" decay to min_lr | "constant" (the stable phase of WSD)
    max_steps: int = 5000  # optimizer steps (ignored when max_tokens > 0)
    max_tokens: int = (
        0  # if > 0: train on this many tokens (steps = ceil(tokens / tokens per step))
    )
    weight_decay: float = 0.1  # AdamW decay of matrices (not of norm gains)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    # bookkeeping
    eval_every: int = 500  # steps between validation evaluations (0 = only at the end)
    eval_batches: int = 8  # validation batches per modality
    eval_samples: int = 4  # t-samples per sequence in the NELBO estimate
    ckpt_every: int = 500  # steps between saved training states (0 = only at the end)
    log_every: int = 10  # steps between log lines
    seed: int = 0  # seeds the model init, the data sampler and the masking
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N"
    num_threads: int = 0  # torch CPU threads (0 = every core this process may use)
    weights_dtype: str = "float32"  # dtype of the final model.safetensors ("bfloat16" halves it)
    autocast: str = (
        "auto"  # "auto" (bf16 on CUDA and on CPUs with AMX/AVX512-BF16) | "bf16" | "off"
    )

    def __post_init__(self) -> None:
        positive = ("d_model", "n_layers", "n_heads", "seq_len", "batch_size", "grad_accum")
        checks: dict[str, bool] = {name: getattr(self, name) > 0 for name in positive}
        checks |= {
            "objective": self.objective in ("diffusion", "block_diffusion", "ar"),
            "block_size": self.block_size >= 1,
            "block_warmup": all(1 <= b <= self.block_size for b in self.block_warmup),
            "block_warmup_share": 0.0 <= self.block_warmup_share < 1.0,
            "t_min": 0.0 < self.t_min <= self.t_max <= 1.0,
            "infill_reorder": 0.0 <= self.infill_reorder <= 1.0,
            "infill_longer": 0.0 <= self.infill_longer <= 1.0,
            "span_end_weight": self.span_end_weight > 0,
            "schedule": self.schedule in ("cosine", "constant"),
            "autocast": self.autocast in ("auto", "bf16", "off"),
            "lr": self.lr > 0,
            "min_lr": 0 <= self.min_lr <= self.lr,
            "eps": 0.0 <= self.eps < 1.0,
            "max_steps": self.max_steps > 0 or self.max_tokens > 0,
            "device": self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "weights_dtype": self.weights_dtype in ("float32", "bfloat16"),
        }
        nonneg = ("warmup_steps", "max_tokens", "weight_decay", "grad_clip", "eval_every")
        nonneg += ("eval_batches", "ckpt_every", "num_threads", "dropout")
        checks |= {name: getattr(self, name) >= 0 for name in nonneg}
        checks |= {"eval_samples": self.eval_samples > 0, "log_every": self.log_every > 0}
        for name, ok in checks.items():
            if not ok:
                raise InvalidArgument(
                    f"invalid training setting {name}={getattr(self, name)!r}",
                    field=name,
                    value=getattr(self, name),
                )

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise InvalidArgument(
                f"unknown training settings: {', '.join(unknown)}", field="config"
            )
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"cannot read {path}: {exc}", field="config") from exc

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.max_tokens > 0:
            return math.ceil(self.max_tokens / self.tokens_per_step)
        return self.max_steps

    def block_size_at(self, step: int) -> int:
        """Block size of a step: the warm-up sizes in order over the first share, then the last."""
        if not self.block_warmup:
            return self.block_size
        per = self.block_warmup_share * self.total_steps / len(self.block_warmup)
        stage = int(step // max(per, 1e-9))
        return self.block_warmup[stage] if stage < len(self.block_warmup) else self.block_size

    def model_config(self, vocab_size: int, mask_id: int) -> ModelConfig:
        block = self.objective == "block_diffusion"
        return ModelConfig(
            vocab_size=vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            mlp_hidden=self.mlp_hidden,
            max_seq_len=self.seq_len,
            rope_theta=self.rope_theta,
            dropout=self.dropout,
            attention={"ar": "causal", "block_diffusion": "block_causal"}.get(
                self.objective, "full"
            ),
            block_size=self.block_size if block else 1,
            token_shift=block and self.token_shift,
            mask_id=mask_id,
        )


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to cfg.min_lr at the end."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def configure_optimizer(model: Denoiser, cfg: TrainConfig, device: torch.device):
    # matrices (linear layers, tied embedding) decay; 1-D norm gains do not
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument("CUDA requested but not available", field="device", value=name)
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX-BF16 or AVX512-BF16 (bf16 matmuls then run ~2x fp32; elsewhere
    bf16 is emulated and slower). The same check picks the inference dtype at load."""
    return bool(checkpoint.cpu_bf16_flags())


def use_bf16(device: torch.device, mode: str = "auto") -> bool:
    if mode == "off":
        return False
    if mode == "bf16":
        return True
    return device.type == "cuda" or cpu_has_fast_bf16()


def _autocast(device: torch.device, mode: str = "auto"):
    """bf16 autocast (fp32 master weights; norms and losses are computed in fp32)."""
    if use_bf16(device, mode):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"1x {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def _structural_ids(vocab: Any, device: torch.device) -> torch.Tensor | None:
    if not hasattr(vocab, "midi_structural_mask"):
        return None
    return torch.as_tensor(vocab.midi_structural_mask(), dtype=torch.bool, device=device)


def batch_loss(
    model: Denoiser,
    batch,
    cfg: TrainConfig,
    special: SpecialIds,
    structural: torch.Tensor | None,
    generator: torch.Generator,
    block_size: int | None = None,
):
    """Loss of one micro-batch under cfg.objective -> (scalar loss, LossStats).

    block_size: block diffusion only, this step's size (warm-up); None = cfg.block_size."""
    if cfg.objective == "ar":
        logits, _ = model(batch.ids)
        return ar_loss(logits, batch.ids, batch.target_mask)
    maskable = build_maskable(
        batch.ids,
        prompt_len=batch.prompt_len,
        target_mask=batch.target_mask,
        spans=batch.spans,
        keep_ids=structural,
        keep_rows=batch.keep_structure,
    )
    if cfg.objective == "block_diffusion":
        ids, positions, weight = batch.ids, None, None
        infill_rows = ~batch.spans.all(dim=1)
        if cfg.infill_reorder > 0 and bool(infill_rows.any()):
            u = torch.rand(len(batch), generator=generator, device=generator.device)
            chosen = infill_rows & (u.to(ids.device) < cfg.infill_reorder)
            spans = batch.spans
            if cfg.infill_longer > 0:  # not MIDI bar infill: its gaps keep the bar's structure
                ids, maskable, spans = lengthen_gaps(
                    ids, maskable, spans, chosen & ~batch.keep_structure, share=cfg.infill_longer,
                    eos_id=special.eos, pad_id=special.pad, generator=generator,
                )  # fmt: skip
            ids, maskable, positions = reorder_for_infill(ids, maskable, spans, chosen)
            if cfg.span_end_weight != 1.0:  # in reordered rows the targets are the gaps
                ends = chosen[:, None] & maskable & (ids == special.eos)
                weight = 1.0 + (cfg.span_end_weight - 1.0) * ends.float()
        return block_diffusion_loss(
            model,
            ids,
            maskable,
            special.mask,
            positions=positions,
            block_size=block_size or cfg.block_size,
            t_min=cfg.t_min,
            t_max=cfg.t_max,
            complementary=cfg.complementary,
            generator=generator,
            target_weight=weight,
        )
    t = sample_t(len(batch), cfg.eps, generator, device=batch.ids.device)
    xt, masked = mask_tokens(batch.ids, t, maskable, special.mask, generator)
    logits, _ = model(xt)
    return diffusion_loss(logits, batch.ids, masked, t, maskable)


@torch.no_grad()
def evaluate(
    model: Denoiser,
    val_docs: dict,
    special: SpecialIds,
    cfg: TrainConfig,
    device: torch.device,
    *,
    left_to_right: bool = False,
) -> dict[str, float]:
    """Nats per document token (content + EOS) on the validation split, per modality.

    Diffusion: NELBO (an upper bound on the NLL); AR: the exact NLL; block diffusion with
    `left_to_right`: the exact NLL of decoding each block left to right, one token per step
    (`block_order_nll`). The numerator covers every
    position after BOS + tag, PAD tail included; charging it to the document tokens keeps both a
    proper bound on -log p(document) per token, comparable between the two objectives.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 2)  # same noise every eval
    out = {}
    for modality, docs in sorted(val_docs.items()):
        total, n_tokens = 0.0, 0
        batches = eval_batches(
            docs,
            modality,
            special,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            max_batches=cfg.eval_batches,
        )
        for batch in batches:
            batch = batch.to(device)
            with _autocast(device, cfg.autocast):
                if cfg.objective == "ar":
                    _, rows = ar_nll(model, batch.ids, batch.target_mask)
                elif cfg.objective == "block_diffusion" and left_to_right:
                    _, rows = block_order_nll(
                        model,
                        batch.ids,
                        batch.target_mask,
                        special.mask,
                        block_size=cfg.block_size,
                    )
                elif cfg.objective == "block_diffusion":
                    _, rows = block_nelbo(
                        model,
                        batch.ids,
                        batch.target_mask,
                        special.mask,
                        block_size=cfg.block_size,
                        samples=cfg.eval_samples,
                        eps=cfg.eps,
                        generator=generator,
                    )
                else:
                    _, rows = nelbo(
                        model,
                        batch.ids,
                        batch.target_mask,
                        special.mask,
                        samples=cfg.eval_samples,
                        eps=cfg.eps,
                        generator=generator,
                    )
            total += float(rows.sum())
            n_tokens += int(batch.doc_tokens.sum())
        if n_tokens:
            out[modality] = total / n_tokens
    model.train(was_training)
    return out


def initial_weights(path: str | Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights to start from: a model directory or a training state (state.pt). The shapes must
    fit `model_cfg`; the attention pattern may differ (AR -> block diffusion conversion)."""
    path = Path(path)
    if path.is_dir() and (path / STATE_FILE).exists() and not (path / checkpoint.WEIGHTS).exists():
        path = path / STATE_FILE
    if path.is_file():
        weights = torch.load(path, map_location="cpu", weights_only=True)["model"]
    else:
        source, _, _ = checkpoint.load(path)
        weights = source.state_dict()
    probe = Denoiser(model_cfg).state_dict()
    if set(weights) != set(probe) or any(weights[k].shape != probe[k].shape for k in probe):
        raise CheckpointError(
            f"the weights in {path} do not fit this model's shape", field="init_from"
        )
    return {k: v.float() for k, v in weights.items()}


def tokens_before(path: str | Path) -> int:
    """Tokens the weights at `path` had seen before this run (their own run and its ancestors)."""
    config = Path(path) / checkpoint.CONFIG
    if not config.exists():
        return 0
    try:
        training = json.loads(config.read_text()).get("training", {})
    except json.JSONDecodeError:
        return 0
    return int(training.get("tokens_seen", 0)) + int(training.get("tokens_before", 0))


def _data_summary(corpus: Path, train_docs: dict) -> str:
    lines = [
        f"- {m}: {len(d):,} documents, {d.n_tokens:,} tokens (train split)"
        for m, d in sorted(train_docs.items())
    ]
    manifest = corpus / "manifest.json"
    if manifest.exists():
        with contextlib.suppress(json.JSONDecodeError):
            sources = json.loads(manifest.read_text()).get("sources", [])
            for s in sources if isinstance(sources, list) else []:
                if isinstance(s, dict):
                    name = s.get("name", s.get("id", "source"))
                    licence = s.get("license", s.get("licence", "licence not recorded"))
                    lines.append(f"- source {name}: {licence}")
                else:
                    lines.append(f"- source {s}")
    return "\n".join(lines) + f"\n\nCorpus: `{corpus}` (see its manifest.json for provenance)."


def _save_state(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _log(out: Path, record: dict) -> None:
    with open(out / LOG_FILE, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def train(
    config: TrainConfig,
    *,
    vocab: Any = None,
    progress: bool = True,
    stop_at: int | None = None,
) -> Path:
    """Train (or resume) and write the model directory config.out; returns its path.

    vocab: an already loaded vocabulary (default: load config.vocab). stop_at: end this session
    after that optimizer step (state and model are saved; a later call continues), e.g. to split a
    run over time-limited jobs without changing its learning-rate schedule.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads or len(os.sched_getaffinity(0)))
    try:
        return _train(config, vocab, progress, stop_at)
    finally:
        torch.set_num_threads(threads)  # a library call should not leave the process changed


def _train(cfg: TrainConfig, vocab: Any, progress: bool, stop_at: int | None) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if vocab is None:
        from unmask.tokenizers.vocab import UnifiedVocab  # late: the tokenizers pull in miditok

        vocab = UnifiedVocab.load(cfg.vocab or None)
    special = SpecialIds.from_vocab(vocab)

    corpus = Path(cfg.corpus)
    train_docs, val_docs = load_split(corpus, "train"), load_split(corpus, "val")
    for split, docs in (("train", train_docs), ("val", val_docs)):
        for m, d in docs.items():
            if d.n_tokens and int(d.tokens.max()) >= vocab.size:
                raise VocabMismatch(
                    f"corpus {split}/{m} holds ids up to {int(d.tokens.max())}, beyond the "
                    f"vocabulary of {vocab.size}: it was tokenized with another vocabulary",
                    field="corpus",
                    value=str(corpus),
                )

    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config(vocab.size, special.mask)
    model = Denoiser(model_cfg).to(device)
    if cfg.init_from and not (out / STATE_FILE).exists():
        model.load_state_dict(initial_weights(cfg.init_from, model_cfg))
    optimizer = configure_optimizer(model, cfg, device)
    sampler = BatchSampler(
        train_docs,
        special,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        weights=cfg.modality_weights or None,
        crop_share=cfg.crop_share,
        # drawn for AR too (and ignored by its loss): both objectives then get identical rows
        prompt_share=cfg.prompt_share,
        infill_share=cfg.infill_share,
        seed=cfg.seed,
    )
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # t and masks
    structural = _structural_ids(vocab, device)
    step, tokens_seen, wall_before, last_eval = 0, 0, 0.0, {}

    state_path = out / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state["model_config"] != model_cfg.to_dict() or state["objective"] != cfg.objective:
            raise CheckpointError(
                f"{out} holds the training state of a different model or objective; "
                "choose another output directory",
                field="out",
                value=str(out),
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        step, tokens_seen = state["step"], state["tokens_seen"]
        wall_before, last_eval = state["wall_time_s"], state.get("eval", {})

    total = cfg.total_steps
    end = total if stop_at is None else min(total, stop_at)
    t_start = time.time()

    def save_state() -> None:
        _save_state(
            state_path,
            {
                "step": step,
                "tokens_seen": tokens_seen,
                "wall_time_s": wall_before + time.time() - t_start,
                "eval": last_eval,
                "objective": cfg.objective,
                "model_config": model_cfg.to_dict(),
                "train_config": cfg.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler": sampler.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
        )

    model.train()
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"train {cfg.objective}")
    t_log, tokens_log, loss_log, n_log = time.time(), tokens_seen, torch.zeros((), device=device), 0
    saved_at = step
    while step < end:
        lr = lr_at(step, cfg, total)
        block_now = cfg.block_size_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum):
            batch = sampler.next_batch().to(device)
            with _autocast(device, cfg.autocast):
                loss, _ = batch_loss(model, batch, cfg, special, structural, generator, block_now)
            (loss / cfg.grad_accum).backward()
            loss_log += loss.detach() / cfg.grad_accum
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if cfg.grad_clip > 0
            else None
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n_log += 1
        tokens_seen += cfg.tokens_per_step
        bar.update(1)

        if step % cfg.log_every == 0 or step == end:
            mean_loss = float(loss_log) / n_log
            tok_s = (tokens_seen - tokens_log) / max(time.time() - t_log, 1e-9)
            bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tok_s:,.0f}")
            record = {"step": step, "loss": mean_loss, "lr": lr, "tokens": tokens_seen}
            if cfg.objective == "block_diffusion":
                record["block_size"] = block_now
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            _log(out, record | {"tok_per_s": tok_s})
            t_log, tokens_log, n_log = time.time(), tokens_seen, 0
            loss_log = torch.zeros((), device=device)
        if val_docs and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            last_eval = evaluate(model, val_docs, special, cfg, device)
            _log(out, {"step": step, "eval": last_eval})
            bar.write(f"step {step}: val nats/token {json.dumps(last_eval)}")
        if cfg.ckpt_every and step % cfg.ckpt_every == 0:
            save_state()
            saved_at = step
    bar.close()

    if step >= total and val_docs:
        last_eval = evaluate(model, val_docs, special, cfg, device)
        _log(out, {"step": step, "eval": last_eval})
    if saved_at != step or not state_path.exists():
        save_state()
    meta = {
        "name": out.name,
        "objective": cfg.objective,
        "training": {
            "steps": step,
            "finished": step >= total,
            "tokens_seen": tokens_seen,
            "tokens_before": tokens_before(cfg.init_from) if cfg.init_from else 0,
            "wall_time_s": round(wall_before + time.time() - t_start, 1),
            "hardware": _hardware(device),
        },
        "train_config": cfg.to_dict(),
        "eval": last_eval,
        "train_precision": "bf16 autocast" if use_bf16(device, cfg.autocast) else "fp32",
        "data": _data_summary(corpus, train_docs),
    }
    return checkpoint.save(out, model, vocab, meta, weights_dtype=cfg.weights_dtype)


# ---- command line ------------------------------------------------------------------------------


def _parse_weights(text: str) -> dict[str, float]:
    """ "text=1,code=0.5,midi=1" -> {"text": 1.0, "code": 0.5, "midi": 1.0}."""
    try:
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected modality=weight,...: {text!r}") from exc


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N,N,...: {text!r}") from exc


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false: {text!r}")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (e.g. --max-steps); flags override --config."""
    parser.add_argument("--config", metavar="JSON", help="JSON file of TrainConfig fields")
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        tp = hints[f.name]
        if isinstance(tp, types.UnionType):  # `int | None`
            tp = next(a for a in tp.__args__ if a is not type(None))
        default = f.default_factory() if callable(f.default_factory) else f.default
        kwargs: dict[str, Any] = {"default": None, "help": f"(default: {default})"}
        if tp is dict or getattr(tp, "__origin__", None) is dict:
            kwargs |= {"type": _parse_weights, "metavar": "M=W,..."}
        elif getattr(tp, "__origin__", None) is list:
            kwargs |= {"type": _parse_ints, "metavar": "N,N,..."}
        elif tp is bool:
            kwargs |= {"type": _parse_bool, "metavar": "true|false"}
        else:
            kwargs["type"] = tp
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="write the model directory from the saved training state and stop (no training; "
        "safe while the run goes on in another process)",
    )
    parser.add_argument("--stop-at", type=int, default=None, help="end this session at step N")
    parser.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config (if given) with every flag that was set overriding it."""
    cfg = TrainConfig.from_json(args.config) if getattr(args, "config", None) else TrainConfig()
    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    return replace(cfg, **overrides)


def run_train(args: argparse.Namespace) -> int:
    stop_at = 0 if getattr(args, "export_only", False) else getattr(args, "stop_at", None)
    path = train(
        config_from_args(args), progress=not getattr(args, "quiet", False), stop_at=stop_at
    )
    print(path)
    return 0
