"""Public (Hugging Face layout) checkpoints: config.json + model.safetensors or shards with
model.safetensors.index.json + tokenizer.json, loaded onto our network through a family adapter.

Loading is lazy and never holds a second copy of the weights: the network is built on the meta
device (no memory), then each parameter is read from its shard (memory-mapped by safetensors),
fused where we fuse (q/k/v, gate/up), cast to the requested dtype, moved to the device and
assigned; the host copy of a tensor is dropped before the next one is read. Nothing is ever
downloaded, and no code from the checkpoint runs (no trust_remote_code): only data files are read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from unmask.errors import CheckpointError, InvalidArgument
from unmask.models.families import Family, Specials, detect
from unmask.models.network import Denoiser, ModelConfig
from unmask.tokenizers.hf import HFTokenizer

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_hf_checkpoint(directory: str | Path) -> bool:
    """A Hugging Face layout (config.json with `architectures` or `model_type`, no unmask
    `format_version`)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        return False
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "format_version" not in cfg and bool(cfg.get("architectures") or cfg.get("model_type"))


def resolve_dtype(dtype: str | None, device: str | torch.device) -> torch.dtype:
    """auto/None: as for our own models (`checkpoint.inference_dtype`: bf16 where the hardware
    runs it natively, else fp32; UNMASK_DTYPE overrides); or bfloat16 / float16 / float32."""
    if dtype in (None, "", "auto"):
        from unmask.models.checkpoint import inference_dtype

        return inference_dtype(device, "auto")
    if dtype not in DTYPES:
        raise InvalidArgument(
            f"must be auto or one of {', '.join(DTYPES)}", field="dtype", value=dtype
        )
    return DTYPES[dtype]


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded with an index, or one file)."""
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"unreadable {INDEX}: {exc}", field="weights") from exc
        files = {name: directory / shard for name, shard in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.exists()})
        if missing:
            raise CheckpointError(
                f"{INDEX} names shard(s) that are not in {directory}: {', '.join(missing)}",
                field="weights",
                value=missing,
            )
        return files
    single = directory / WEIGHTS
    if not single.exists():
        raise CheckpointError(
            f"{directory} has neither {WEIGHTS} nor {INDEX}", field="weights", value=str(directory)
        )
    with safe_open(str(single), framework="pt") as fh:
        return dict.fromkeys(fh.keys(), single)


def content_hash(directory: Path, files: set[Path]) -> str:
    """sha256 over config.json, the tokenizer files and each weight file's safetensors header
    (names, dtypes, shapes, offsets) and size: changes whenever the checkpoint does, without
    reading gigabytes of weights."""
    digest = hashlib.sha256()
    for name in (CONFIG, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (directory / name).exists():
            digest.update(name.encode() + (directory / name).read_bytes())
    for path in sorted(files):
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            digest.update(path.name.encode() + fh.read(n))
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def specials(family: Family, cfg: dict, tok: HFTokenizer) -> Specials:
    """MASK / EOS / PAD / BOS from config.json, then the tokenizer, then the family's fallback."""
    from unmask.models.families.base import first_id

    mask = first_id(cfg.get("mask_token_id"))
    if mask is None:
        mask = next(
            (tok.token_id(t) for t in family.mask_tokens if tok.token_id(t) is not None), None
        )
    if mask is None:
        mask = family.mask_fallback
    eos = first_id(cfg.get("eos_token_id"))
    if eos is None:
        eos = tok.config_token_id("eos_token")
    if mask is None or eos is None:
        raise CheckpointError(
            "cannot tell the MASK or EOS id from config.json or the tokenizer",
            field="mask_token_id",
        )
    bos = first_id(cfg.get("bos_token_id"))
    if bos is None:
        bos = tok.config_token_id("bos_token")
    pad = first_id(cfg.get("pad_token_id"))
    if pad is None:
        pad = tok.config_token_id("pad_token")
    if pad is not None and pad == mask:
        raise CheckpointError(
            f"the padding id equals the MASK id ({mask}): a padded position would read as "
            "masked; fix pad_token_id in config.json",
            field="pad_token_id",
            value=pad,
        )
    if pad is None or pad == eos:
        # Our samplers write PAD after EOS and never predict it, so PAD must differ from EOS
        # (LLaDA and Dream declare pad == eos): use BOS, else the first other special token.
        candidates = ([bos] if bos is not None else []) + sorted(tok.special_ids)
        pad = next((i for i in candidates if i not in (eos, mask)), None)
        if pad is None:
            raise CheckpointError(
                "the tokenizer has no special token to pad with besides EOS and MASK",
                field="pad_token_id",
            )
    return Specials(mask_id=int(mask), eos_id=int(eos), pad_id=int(pad), bos_id=bos)


def _backbone(family: Family, vocab_size: int, mask_id: int) -> ModelConfig:
    """The family's network config; a value our network cannot take is the checkpoint's fault."""
    try:
        return family.backbone(vocab_size=vocab_size, mask_id=mask_id)
    except InvalidArgument as exc:
        raise CheckpointError(
            f"config.json does not fit the network: {exc.message}", field=exc.field, value=exc.value
        ) from exc


def load_hf(
    directory: str | Path, device: str | torch.device = "cpu", dtype: str | None = None
) -> tuple[Denoiser, HFTokenizer, dict[str, Any]]:
    """A public checkpoint -> (network in eval mode on `device`, tokenizer, meta). Raises
    CheckpointError (FAILED_PRECONDITION) for an unknown architecture, missing shards, tensors
    whose shapes do not fit the config, or ids that cannot work (pad == mask)."""
    directory = Path(directory)
    try:
        cfg = json.loads((directory / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable {CONFIG}: {exc}", field="model_dir") from exc
    family = detect(cfg)
    tok = HFTokenizer(directory)
    ids = specials(family, cfg, tok)
    tok.set_specials(mask_id=ids.mask_id, eos_id=ids.eos_id, pad_id=ids.pad_id, bos_id=ids.bos_id)
    files = weight_files(directory)
    torch_dtype = resolve_dtype(dtype, device)

    with torch.device("meta"):
        # the embedding's row count is the model's vocabulary (it may exceed the tokenizer's)
        probe = _backbone(family, max(tok.size, ids.mask_id + 1), ids.mask_id)
        targets = list(Denoiser(probe).state_dict())
        sources = family.tensor_map(targets, probe.tie_embeddings)
        emb_name = sources["tok_emb.weight"][0]
        if emb_name not in files:
            raise CheckpointError(f"the checkpoint has no {emb_name}", field="weights")
    with safe_open(str(files[emb_name]), framework="pt") as fh:
        vocab_size = int(fh.get_slice(emb_name).get_shape()[0])
    config = _backbone(family, vocab_size, ids.mask_id)
    for name, value in (("mask", ids.mask_id), ("eos", ids.eos_id), ("pad", ids.pad_id)):
        if not 0 <= value < vocab_size:
            raise CheckpointError(
                f"the {name} id {value} is outside the model's {vocab_size} embeddings",
                field=f"{name}_token_id",
                value=value,
            )
    with torch.device("meta"):
        model = Denoiser(config)
    expected = model.state_dict()

    state: dict[str, torch.Tensor] = {}
    done: dict[tuple[str, ...], torch.Tensor] = {}
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(name: str) -> torch.Tensor:
            if name not in files:
                raise CheckpointError(
                    f"the checkpoint has no tensor {name} (family {family.name})",
                    field="weights",
                    value=name,
                )
            path = files[name]
            if path not in handles:
                try:
                    handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
                except Exception as exc:  # a damaged shard
                    raise CheckpointError(
                        f"unreadable shard {path.name}: {exc}", field="weights"
                    ) from exc
            return handles[path].get_tensor(name)

        for target, names in sources.items():
            if names in done:  # a tied head: the embedding tensor already on the device
                state[target] = done[names]
                continue
            parts = [read(n) for n in names]
            try:
                tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            except RuntimeError as exc:
                raise CheckpointError(
                    f"tensors {', '.join(names)} cannot be joined: {exc}", field="weights"
                ) from exc
            del parts
            want = tuple(expected[target].shape)
            if tuple(tensor.shape) != want:
                raise CheckpointError(
                    f"shape mismatch: {' + '.join(names)} has shape {tuple(tensor.shape)}, "
                    f"config.json implies {want}",
                    field="weights",
                    value=names[0],
                )
            state[target] = done[names] = tensor.to(device=device, dtype=torch_dtype)
            del tensor
    model.load_state_dict(state, strict=True, assign=True)
    del state, done
    model.materialize_buffers(device)
    model.eval()

    pattern, block = family.attention()
    meta = {
        "name": directory.name,
        "public": True,
        "family": family.name,
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "parameters": model.num_parameters(),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "mask_id": ids.mask_id,
        "eos_id": ids.eos_id,
        "pad_id": ids.pad_id,
        "attention": pattern,
        "block_size": block if pattern == "block_causal" else 0,
        "shift": family.shift(),
        "cache_modes": family.cache_modes(),
        "modalities": ["text", "code"],
        "content_hash": content_hash(directory, set(files.values())),
        "chat_template": tok.chat_template is not None,
        "add_bos": family.add_bos,
        "sampler_defaults": family.sampler_defaults(),
    }
    return model, tok, meta
