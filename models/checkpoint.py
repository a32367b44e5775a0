"""Model directories: everything needed to load a trained model, and nothing that can drift apart.

    model.safetensors   weights (tied embedding stored once; fp32, or bf16 to halve the size)
    config.json         model config, objective, training summary, eval numbers, vocab content hash
    vocab/              the tokenizer files (vocab.save(...))
    MODEL_CARD.md       human-readable summary (data and licences, tokens seen, hardware, evals)

`load` refuses a directory whose tokenizer files do not hash to the value recorded at save time:
a model only makes sense with the exact vocabulary it was trained with.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unmask.errors import CheckpointError, InvalidArgument, VocabMismatch
from unmask.models.network import Denoiser, ModelConfig

FORMAT_VERSION = 1
WEIGHTS, CONFIG, VOCAB_DIR, CARD = "model.safetensors", "config.json", "vocab", "MODEL_CARD.md"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_RESERVED = ("format_version", "model", "vocab_content_hash", "weights_dtype", "parameters")


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(
    directory: str | Path,
    model: Denoiser,
    vocab: Any,
    meta: dict | None = None,
    *,
    weights_dtype: str = "float32",
) -> Path:
    """Write a model directory. `vocab`: any object with .save(dir) and .content_hash.

    meta (all keys optional, stored in config.json): objective ("diffusion" | "ar"; default from
    config.causal), name, training {steps, tokens_seen, wall_time_s, hardware, ...},
    eval {modality: nats per token}, data (markdown: sources and licences), notes.
    weights_dtype "bfloat16" halves the file; weights are cast back to fp32 on load.
    """
    if weights_dtype not in _DTYPES:
        raise InvalidArgument(
            f"weights_dtype must be one of {', '.join(_DTYPES)}", field="weights_dtype"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    meta.setdefault("objective", "ar" if model.config.causal else "diffusion")

    # safetensors refuses shared storage: store each tied tensor once and record the alias
    state, tied, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor.detach().to("cpu", _DTYPES[weights_dtype]).contiguous()
    header = {"format": "unmask", "tied": json.dumps(tied)}
    _write_atomic(directory / WEIGHTS, lambda p: save_file(state, str(p), metadata=header))

    config = {
        **{k: v for k, v in meta.items() if k not in _RESERVED},
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "parameters": model.num_parameters(),
        "weights_dtype": weights_dtype,
        "vocab_content_hash": vocab.content_hash,
    }
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomic(directory / CONFIG, lambda p: p.write_text(text))
    vocab.save(directory / VOCAB_DIR)
    card = model_card(model, vocab, config)
    _write_atomic(directory / CARD, lambda p: p.write_text(card))
    return directory


def is_public(directory: str | Path) -> bool:
    """A public (Hugging Face layout) checkpoint, loaded by models/hf_checkpoint.py."""
    from unmask.models.hf_checkpoint import is_hf_checkpoint

    return is_hf_checkpoint(directory)


def _default_vocab_loader(path: Path) -> Any:
    from unmask.tokenizers.vocab import UnifiedVocab  # late: the tokenizers pull in miditok

    return UnifiedVocab.load(path)


INFERENCE_DTYPES = ("auto", "float32", "bfloat16")
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo: native bf16 dot products


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU's native bf16 instruction sets (AMX-BF16, AVX512-BF16) named in /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return [f for f in _BF16_CPU_FLAGS if f in flags]


def inference_dtype(
    device: str | torch.device = "cpu", requested: str = "auto", cpuinfo: str | None = None
) -> torch.dtype:
    """The dtype to run a model in: `requested`, or for "auto" bf16 where the hardware has it
    natively (a CUDA GPU with bf16 support; a CPU with AMX-BF16 or AVX512-BF16) and fp32
    elsewhere (emulated bf16 matmuls are slower than fp32). The override `UNMASK_DTYPE` (auto,
    float32, bfloat16) wins over "auto". bf16 does not give fp32's tokens: runs that must match
    bit for bit (greedy references, tests) ask for float32."""
    if requested == "auto":
        requested = os.environ.get("UNMASK_DTYPE", "auto") or "auto"
    if requested not in INFERENCE_DTYPES:
        raise InvalidArgument(
            f"must be one of {', '.join(INFERENCE_DTYPES)}", field="dtype", value=requested
        )
    if requested != "auto":
        return _DTYPES[requested]
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if dev.type == "cpu" and cpu_bf16_flags(cpuinfo):
        return torch.bfloat16
    return torch.float32


def cast_weights(model: Denoiser, dtype: torch.dtype) -> Denoiser:
    """Parameters in `dtype`; buffers (RoPE angles, the banned-id mask) stay as they are, so
    positions keep fp32 angles. RMSNorm and RoPE compute in fp32 either way."""
    for param in model.parameters():  # a tied matrix is one parameter: cast once, still tied
        param.data = param.data.to(dtype)
    return model


def load(
    directory: str | Path,
    device: str | torch.device = "cpu",
    vocab_loader: Callable[[Path], Any] | None = None,
    dtype: str = "float32",
) -> tuple[Denoiser, Any, dict]:
    """Read a model directory -> (model in eval mode on `device`, vocab, config.json as a dict).

    `dtype`: the weights' dtype for inference, "float32" (default: training, evaluation), or
    "auto" / "bfloat16" (`inference_dtype`); the model's `inference_dtype` attribute says which.
    Raises CheckpointError for missing or inconsistent files and VocabMismatch when the tokenizer
    files in the directory are not the ones the model was trained with.
    """
    run_dtype = inference_dtype(device, dtype) if dtype != "float32" else torch.float32
    directory = Path(directory)
    if vocab_loader is None and is_public(directory):  # LLaDA, Dream, SDAR, ... (its tokenizer)
        from unmask.models.hf_checkpoint import load_hf

        return load_hf(directory, device=device, dtype=dtype)  # type: ignore[return-value]
    for name in (WEIGHTS, CONFIG, VOCAB_DIR):
        if not (directory / name).exists():
            raise CheckpointError(
                f"{directory} is not a model directory: {name} is missing",
                field="model_dir",
                value=str(directory),
            )
    try:
        config = json.loads((directory / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"unreadable {CONFIG}: {exc}", field="model_dir") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"unsupported model format {config.get('format_version')!r}",
            field="format_version",
            value=config.get("format_version"),
        )

    vocab = (vocab_loader or _default_vocab_loader)(directory / VOCAB_DIR)
    expected = config.get("vocab_content_hash")
    if vocab.content_hash != expected:
        raise VocabMismatch(
            f"the tokenizer in {directory / VOCAB_DIR} (content hash {vocab.content_hash}) is not "
            f"the one this model was trained with (content hash {expected}); use the vocab saved "
            "with the model",
            field="vocab",
            value=vocab.content_hash,
        )
    model_config = ModelConfig.from_dict(config["model"])
    if getattr(vocab, "size", model_config.vocab_size) != model_config.vocab_size:
        raise VocabMismatch(
            f"vocabulary has {vocab.size} ids but the model expects {model_config.vocab_size}",
            field="vocab",
            value=vocab.size,
        )

    model = Denoiser(model_config)
    try:
        state = load_file(str(directory / WEIGHTS))
        with safe_open(str(directory / WEIGHTS), framework="pt") as fh:  # alias table: header
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise CheckpointError(f"unreadable {WEIGHTS}: {exc}", field="weights") from exc
    for alias, source in json.loads(metadata.get("tied", "{}")).items():
        state[alias] = state[source]
    state = {k: v.float() for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit the config: {exc}", field="weights") from exc
    model = cast_weights(model.to(device), run_dtype) if run_dtype != torch.float32 else model
    model.inference_dtype = str(run_dtype).removeprefix("torch.")
    return model.to(device).eval(), vocab, config


def _fmt_duration(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def model_card(model: Denoiser, vocab: Any, config: dict) -> str:
    """MODEL_CARD.md text from the model and the fields recorded in config.json."""
    training = config.get("training", {})
    evals = config.get("eval", {})
    ar = config.get("objective") == "ar"
    metric = "exact NLL" if ar else "NELBO (upper bound on NLL)"
    if evals:
        rows = "\n".join(
            f"| {m} | {v:.4f} | {math.exp(min(v, 700.0)):.4g} |" for m, v in sorted(evals.items())
        )
        eval_text = (
            f"Validation split, nats per document token (content + EOS), {metric}.\n\n"
            "| modality | nats/token | perplexity" + ("" if ar else " (bound)") + " |\n"
            "|---|---|---|\n" + rows
        )
    else:
        eval_text = "No evaluation recorded."
    tokens = training.get("tokens_seen")
    before = training.get("tokens_before") or 0
    before_text = (
        f" in this run, after {before:,} seen by the weights it started from "
        f"({tokens + before:,} in all)"
        if before and isinstance(tokens, int)
        else ""
    )
    wall = training.get("wall_time_s")
    objective = {
        "ar": "autoregressive baseline (next-token prediction, causal attention)",
        "block_diffusion": "block diffusion (masked diffusion inside blocks of "
        f"{model.config.block_size}, block-causal attention, exact KV cache)",
    }.get(
        config.get("objective", ""),
        "discrete masked diffusion (absorbing MASK state, bidirectional attention)",
    )
    defaults = config.get("sampler_defaults") or {}
    defaults_text = (
        "\n".join(f"- {m}: `{json.dumps(d, sort_keys=True)}`" for m, d in sorted(defaults.items()))
        if defaults
        else "None recorded: SamplerParams' own defaults apply."
    )
    return f"""# {config.get("name", "unmask model")}

One {objective} model for text, code and MIDI over a unified vocabulary.

## Model

```
{model.describe()}
```

- Objective: {config.get("objective")}
- Vocabulary: {model.config.vocab_size} ids, content hash `{vocab.content_hash}` (files in `vocab/`)
- Weights: `model.safetensors`, {config.get("weights_dtype")}

## Training data and licences

{config.get("data", "Not recorded.")}

## Training

- Tokens seen: {f"{tokens:,}" if isinstance(tokens, int) else "not recorded"}{before_text}
- Optimizer steps: {training.get("steps", "not recorded")}
- Hardware: {training.get("hardware", "not recorded")}
- Wall time: {_fmt_duration(wall) if isinstance(wall, int | float) else "not recorded"}

## Sampler defaults (config.json `sampler_defaults`)

A request's unset knobs take these, per modality (CLI, gRPC, batch jobs and the Engine alike):

{defaults_text}

## Evaluation

{eval_text}

## Intended use and limitations

A small research model trained on a modest compute budget: expect plausible local structure,
not factual or musically polished output. Do not use it where mistakes matter.
{config.get("notes", "")}
"""
