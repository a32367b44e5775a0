"""Achieved GFLOP/s of the shipped model's forward next to the machine's measured GEMM peak, and
where the rest of the time goes.

* GEMM peak: the best of several large matmuls (M = N = K = 1024) in fp32 and bf16, at the
  benchmark's thread count.
* Forward: one denoising step of the block-diffusion model (a block of 4 tokens against a cached
  prefix of 128 positions, logits for the 4) and one AR decode step (1 token, 128 cached) at
  batch 1 and 32, in the dtype `Generator.load` chooses (and fp32). FLOPs are counted from the
  shapes: per token and layer 2·d·3d (qkv) + 2·d² (out) + 2·d·2h + 2·h·d (SwiGLU) + 4·(P+W)·d
  (attention), plus 2·d·V per logit row.
* Where the time goes (torch.profiler, self CPU time): GEMMs, attention, the other small
  kernels, and the rest of the wall time (Python and dispatch between kernels).
* Per step of a whole generation (batch 1, model defaults): the forward vs everything after it
  (sampling, scoring, constraints, events) — the per-step Python work of the sampler.

    python bench/forward_flops.py [--threads 1] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info

from unmask.models.generation import Generator, default_model_dir
from unmask.models.network import KVCache
from unmask.models.sampler_params import MODEL_DEFAULTABLE, SamplerParams

GEMM_ATEN = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
ATTN_ATEN = ("aten::_scaled_dot_product", "aten::scaled_dot_product")


def best_time(fn, reps: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_peak(dtype: torch.dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / best_time(lambda: a @ b) / 1e9


def step_flops(cfg: Any, batch: int, window: int, past: int, out_rows: int) -> float:
    d, h, V = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
    per_token_layer = (
        2 * d * 3 * d + 2 * d * d + 2 * d * 2 * h + 2 * h * d + 4 * (past + window) * d
    )
    return batch * (window * cfg.n_layers * per_token_layer + out_rows * 2 * d * V)


def make_inputs(model: torch.nn.Module, batch: int, window: int, past: int):
    cfg = model.config
    dtype = next(model.parameters()).dtype
    shape = (batch, cfg.n_heads, past, cfg.d_model // cfg.n_heads)
    cache = KVCache([(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype))
                     for _ in range(cfg.n_layers)], torch.ones(batch, past, dtype=torch.bool))  # fmt: skip
    ids = torch.randint(10, cfg.vocab_size, (batch, window))
    start = torch.full((batch,), past)
    out_index = torch.arange(window)[None].expand(batch, -1)
    return ids, cache, start, out_index


def forward_row(model: torch.nn.Module, batch: int, window: int, past: int) -> dict[str, Any]:
    ids, cache, start, out_index = make_inputs(model, batch, window, past)
    pad = torch.ones_like(ids, dtype=torch.bool)

    def fwd():
        return model(ids, pad, start_pos=start, past=cache, use_cache=True, out_index=out_index)

    t = best_time(fwd, reps=9)
    flops = step_flops(model.config, batch, window, past, window)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(5):
            fwd()
        wall = (time.perf_counter() - t0) / 5
    gemm = attn = other = 0.0
    for ev in prof.key_averages():
        self_s = ev.self_cpu_time_total / 1e6 / 5
        if ev.key.startswith(GEMM_ATEN):
            gemm += self_s
        elif ev.key.startswith(ATTN_ATEN):
            attn += self_s
        else:
            other += self_s
    rest = max(wall - gemm - attn - other, 0.0)
    return {
        "batch": batch, "window": window, "past": past, "ms": round(1000 * t, 3),
        "gflop": flops / 1e9, "gflops": flops / t / 1e9,
        "tokens_per_forward_max": batch * window,
        "profile_wall_ms": round(1000 * wall, 3),
        "share": {"gemm": gemm / wall, "attention": attn / wall, "other_kernels": other / wall,
                  "python_and_dispatch": rest / wall},
    }  # fmt: skip


def per_step_split(gen: Generator, n: int) -> dict[str, Any]:
    """One generation at the model's defaults: time in the forward vs after it."""
    model = gen.model
    spent = {"forward": 0.0, "calls": 0}
    inner = model.forward

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent["forward"] += time.perf_counter() - t
            spent["calls"] += 1

    params = SamplerParams(gen_length=n, unset=MODEL_DEFAULTABLE)
    job = gen.prepare_generate("text", "It is a truth universally acknowledged, that", params)
    gen.run(job)  # warm-up
    model.forward = timed
    try:
        t = time.perf_counter()
        out = gen.run(job)
        wall = time.perf_counter() - t
    finally:
        del model.forward
    return {"tokens": out.generated_tokens, "forwards": spent["calls"], "wall_s": wall,
            "ms_per_step": 1000 * wall / max(spent["calls"], 1),
            "forward_ms_per_step": 1000 * spent["forward"] / max(spent["calls"], 1),
            "after_forward_ms_per_step": 1000 * (wall - spent["forward"]) / max(spent["calls"], 1),
            "forward_share": spent["forward"] / wall}  # fmt: skip


def main(argv: list[str] | None = None, log=print) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--length", type=int, default=128, help="tokens of the per-step split run")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    report: dict[str, Any] = {"machine": machine_info(args.threads),
                              "gemm_peak_gflops": {}, "forward": {}, "per_step": {}}  # fmt: skip
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        report["gemm_peak_gflops"][name] = gemm_peak(dt)
    log(f"GEMM peak: {report['gemm_peak_gflops']}")
    for which in ("model", "model-ar"):
        for dtype in ("float32", "auto"):
            gen = Generator.load(default_model_dir(which), dtype=dtype)
            key = f"{which} {gen.model.inference_dtype}"
            window = 1 if gen.is_ar else int(gen.model.config.block_size)
            report["forward"][key] = [forward_row(gen.model, b, window, args.past)
                                      for b in (1, 32)]  # fmt: skip
            report["per_step"][key] = per_step_split(gen, args.length)
            for r in report["forward"][key]:
                log(
                    f"{key} b{r['batch']}: {r['ms']:.2f} ms, {r['gflops']:.1f} GFLOP/s, "
                    f"shares {json.dumps({k: round(v, 2) for k, v in r['share'].items()})}"
                )
            log(f"{key} per step: {json.dumps(report['per_step'][key])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forward_flops.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out / 'forward_flops.json'}")
    return report


if __name__ == "__main__":
    main()
