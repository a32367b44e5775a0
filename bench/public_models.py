"""Public checkpoints through the Engine: step-level batching vs one job at a time.

A random checkpoint of one family in its real layout (tests/public_fixtures.py: real config keys
and tensor names, two shards + index, a trained tokenizer.json) is loaded through its adapter;
N text jobs are submitted at once to an Engine with batching (max_batch = N) and to one with
batching off, for each cache mode the family allows. Reported per run: wall time, generated
tokens/s, forward passes. The default shape is the test fixture's (tiny, CPU, seconds);
`--shape 1b` writes a ~1B-parameter model of the family's real proportions (for a GPU:
`--device cuda --dtype bfloat16`), `--concurrency 1,8,32` runs several batch sizes.

    python bench/public_models.py [--family sdar] [--jobs 8] [--json bench/results/public_models.json]
    python bench/public_models.py --family llada --shape 1b --device cuda --dtype bfloat16 \\
        --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fixture writer (tests/public_fixtures.py)

from public_fixtures import FAMILIES, write_checkpoint  # noqa: E402

from unmask.engine.engine import SUCCEEDED, Engine  # noqa: E402
from unmask.engine.request import GenerationRequest  # noqa: E402
from unmask.models.families.generator import PublicGenerator  # noqa: E402
from unmask.models.sampler_params import SamplerParams  # noqa: E402

PROMPTS = ["the quick brown fox", "def add(a, b):", "rain falls on", "hello world", "for i in"]

# ~1B parameters in each family's own proportions (vocabulary cut to 32k: random weights)
SHAPES_1B = {
    "llada": {"d_model": 2048, "n_heads": 16, "n_kv_heads": 16, "n_layers": 16,
              "mlp_hidden_size": 5632, "vocab_size": 32000, "max_sequence_length": 4096},
    "dream": {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 2,
              "num_hidden_layers": 18, "intermediate_size": 5632, "vocab_size": 32000,
              "max_position_embeddings": 4096},
    "sdar": {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 128, "num_hidden_layers": 20, "intermediate_size": 6144,
             "vocab_size": 32000, "max_position_embeddings": 4096},
}  # fmt: skip
SHAPES_1B["fast_dllm_v2"] = SHAPES_1B["dream"]


def run_engine(gen: PublicGenerator, jobs: int, batching: bool, params: SamplerParams) -> dict:
    engine = Engine(gen, max_batch=max(jobs, 1), batching=batching, max_queue=jobs + 1).start()
    try:
        requests = [
            GenerationRequest(modality="text", prompt=PROMPTS[i % len(PROMPTS)],
                              params=SamplerParams(**{**params.to_dict(), "seed": i}))
            for i in range(jobs)
        ]  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        handles = [engine.submit(r) for r in requests]
        results = [h.result(timeout=3600) for h in handles]
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    assert all(r.status == SUCCEEDED for r in results), [r.error for r in results]
    tokens = sum(int(r.usage.get("generated_tokens", 0)) for r in results)
    return {
        "jobs": jobs,
        "batching": batching,
        "wall_s": round(wall, 4),
        "tokens_per_s": round(tokens / wall, 1),
        "forward_passes": engine.forward_passes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="sdar", choices=FAMILIES)
    ap.add_argument("--shape", default="tiny", choices=("tiny", "1b"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--jobs", type=int, default=8, help="concurrent jobs (one batch size)")
    ap.add_argument("--concurrency", default=None, help="several batch sizes, e.g. 1,8,32")
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    sizes = [int(x) for x in args.concurrency.split(",")] if args.concurrency else [args.jobs]
    with tempfile.TemporaryDirectory() as tmp:
        overrides = SHAPES_1B[args.family] if args.shape == "1b" else None
        store = torch.bfloat16 if args.shape == "1b" else torch.float32
        t0 = time.perf_counter()
        d = write_checkpoint(Path(tmp) / args.family, args.family, 0, overrides, store)
        written = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen = PublicGenerator.load(d, device=args.device, dtype=args.dtype)
        loaded = time.perf_counter() - t0
        meta = gen.meta
        runs = []
        for mode in sorted(meta["cache_modes"]):
            params = SamplerParams(gen_length=args.gen_length, steps=args.steps, use_cache=mode,
                                   stop_at_eos=False)  # fmt: skip
            for jobs in sizes:
                for batching in (True, False):
                    row = {"use_cache": mode, **run_engine(gen, jobs, batching, params)}
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    device_name = (
        torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor()
    )
    report = {
        "family": args.family, "shape": args.shape, "parameters": meta["parameters"],
        "dtype": meta["dtype"], "attention": meta["attention"], "block_size": meta["block_size"],
        "device": args.device, "device_name": device_name or platform.machine(),
        "torch": torch.__version__, "write_s": round(written, 2), "load_s": round(loaded, 2),
        "gen_length": args.gen_length, "steps": args.steps, "runs": runs,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    for mode in sorted({r["use_cache"] for r in runs}):
        for jobs in sizes:
            on = next(r for r in runs if r["use_cache"] == mode and r["jobs"] == jobs
                      and r["batching"])  # fmt: skip
            off = next(r for r in runs if r["use_cache"] == mode and r["jobs"] == jobs
                       and not r["batching"])  # fmt: skip
            print(f"cache {mode:6s} jobs {jobs:3d}: batched {on['tokens_per_s']:9.1f} tok/s "
                  f"({on['forward_passes']} forwards), unbatched {off['tokens_per_s']:9.1f} tok/s "
                  f"({off['forward_passes']} forwards): x{on['tokens_per_s'] / max(off['tokens_per_s'], 1e-9):.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
