"""Training throughput on this machine: tokens/s of fwd + bwd + AdamW for each objective and
precision, in one run so the ratios are comparable (these machines are noisy).

    python bench/train_speed.py [--steps 4] [--threads 1] [--out bench/results/train_speed.json]

Rows: the shipped recipe before the model issue (MDLM, fp32, logits everywhere), MDLM in bf16,
block diffusion (block 4, logits only where a loss is taken) in fp32 and bf16, and the AR
baseline in fp32 and bf16. bf16 rows are skipped on CPUs without AMX/AVX512-BF16 unless --force.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from unmask.corpus.shards import load_split
from unmask.models.data import BatchSampler, SpecialIds
from unmask.models.network import Denoiser
from unmask.models.train import (
    TrainConfig,
    _autocast,
    _structural_ids,
    batch_loss,
    configure_optimizer,
    cpu_has_fast_bf16,
)
from unmask.tokenizers.vocab import UnifiedVocab

ROWS = [
    ("mdlm fp32 (before)", "diffusion", "off"),
    ("mdlm bf16", "diffusion", "bf16"),
    ("block diffusion B=4 fp32", "block_diffusion", "off"),
    ("block diffusion B=4 bf16", "block_diffusion", "bf16"),
    ("ar fp32", "ar", "off"),
    ("ar bf16", "ar", "bf16"),
]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(base: TrainConfig, objective: str, autocast: str, steps: int, vocab, docs) -> float:
    cfg = replace(base, objective=objective, autocast=autocast)
    special = SpecialIds.from_vocab(vocab)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = Denoiser(cfg.model_config(vocab.size, special.mask)).train()
    opt = configure_optimizer(model, cfg, device)
    sampler = BatchSampler(docs, special, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=0)
    gen = torch.Generator().manual_seed(1)
    structural = _structural_ids(vocab, device)

    def step() -> None:
        batch = sampler.next_batch()
        with _autocast(device, cfg.autocast):
            loss, _ = batch_loss(model, batch, cfg, special, structural, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, kernel choice)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * cfg.tokens_per_step / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--force", action="store_true", help="run bf16 rows without fast bf16")
    ap.add_argument("--out", default="bench/results/train_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = UnifiedVocab.load()
    docs = load_split(Path(args.corpus), "train")
    base = TrainConfig(d_model=256, n_layers=4, n_heads=4, seq_len=384, batch_size=16)
    fast = cpu_has_fast_bf16()
    results = []
    for name, objective, autocast in ROWS:
        if autocast == "bf16" and not (fast or args.force):
            print(f"{name:<28} skipped (no AMX/AVX512-BF16)")
            continue
        tok_s = measure(base, objective, autocast, args.steps, vocab, docs)
        results.append({"row": name, "objective": objective, "autocast": autocast, "tok_s": tok_s})
        print(f"{name:<28} {tok_s:>8,.0f} tok/s", flush=True)
    before = next(r["tok_s"] for r in results if r["row"].endswith("(before)"))
    for r in results:
        r["vs_before"] = r["tok_s"] / before
    out = {
        "cpu": cpu_name(),
        "fast_bf16": fast,
        "threads": args.threads,
        "torch": torch.__version__,
        "model": "d256 x 4 layers, batch 16 x 384",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for r in results:
        print(f"{r['row']:<28} {r['vs_before']:.2f}x the shipped recipe")


if __name__ == "__main__":
    main()
