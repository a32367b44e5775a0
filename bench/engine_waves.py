"""In-process Engine waves: N jobs at the model's defaults sent at t = 0 to one Engine, for N in
--levels (default 1, 8, 32, 64), diffusion model and AR baseline, on any device.

The in-process counterpart of the gRPC → Redis → worker waves in bench/service_load.py (the
difference between the two is what the service adds), and the prepared GPU check of issue 15:
on a CUDA machine `python bench/engine_waves.py --device cuda` reports tokens/s at concurrency
1/8/32/64 in the dtype `Generator.load` picks there (bf16 where supported). Not yet run on a GPU.

    python bench/engine_waves.py [--device cpu] [--threads 1] [--length 128] [--out bench/results]
                                 [--no-progress]

--no-progress sends the jobs as the unary Generate call does (`progress=false`: no step events,
so no guesses for the positions a step leaves open); the default is a streamed call's job.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info

from unmask.engine.engine import SUCCEEDED, Engine
from unmask.engine.request import GenerationRequest
from unmask.models.generation import Generator, default_model_dir
from unmask.models.sampler_params import MODEL_DEFAULTABLE, SamplerParams

PROMPTS = ["Once upon a time", "def main():\n", "The river", "import os\n", "She said", "class A:"]


def requests(n: int, length: int, progress: bool = True,
             speculative: bool = False) -> list[GenerationRequest]:  # fmt: skip
    return [
        GenerationRequest(
            "code" if "\n" in PROMPTS[i % len(PROMPTS)] else "text",
            prompt=PROMPTS[i % len(PROMPTS)],
            params=SamplerParams(
                gen_length=length, seed=i, unset=MODEL_DEFAULTABLE, speculative=speculative
            ),  # fmt: skip
            progress=progress,
        )
        for i in range(n)
    ]


def wave(engine: Engine, n: int, length: int, progress: bool = True,
         speculative: bool = False) -> dict[str, Any]:  # fmt: skip
    f0 = engine.forward_passes
    t = time.perf_counter()
    handles = [engine.submit(r) for r in requests(n, length, progress, speculative)]
    results = [h.result(timeout=3600) for h in handles]
    wall = time.perf_counter() - t
    ok = [r for r in results if r.status == SUCCEEDED]
    toks = sum(int(r.usage.get("generated_tokens", 0)) - (r.usage.get("finish_reason") == "eos")
               for r in ok)  # fmt: skip
    return {"jobs": n, "ok": len(ok), "wall_s": wall, "tokens": toks, "tokens_per_s": toks / wall,
            "forwards": engine.forward_passes - f0}  # fmt: skip


def ab_args(doc: str | None) -> argparse.Namespace:
    """The options of an in-process A/B (bench/ab_*.py)."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def ab_waves(engine: Engine, arms: dict[str, Callable[[], None]], rounds: int, length: int,
             levels: tuple[int, ...] = (1, 8, 32)) -> dict[str, Any]:  # fmt: skip
    """In-process A/B: waves of `levels` unary-style jobs (progress=false) under each arm in
    turn, `rounds` times, interleaved so both arms see the same machine load. An arm is a
    function that switches the code to it. Each arm's wall seconds per round and their means."""
    walls: dict[str, list[dict[int, float]]] = {arm: [] for arm in arms}
    wave(engine, 2, length, False)  # warm-up
    for _ in range(rounds):
        for arm, switch in arms.items():
            switch()
            row = {n: wave(engine, n, length, False)["wall_s"] for n in levels}
            walls[arm].append(row)
            print(arm, {n: f"{s:.3f} s" for n, s in row.items()}, flush=True)
    mean = {arm: {n: sum(r[n] for r in rs) / len(rs) for n in levels} for arm, rs in walls.items()}
    return {"rounds": walls, "mean_wall_s": mean}


def main(argv: list[str] | None = None, log=print) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--no-progress", action="store_true", help="jobs as unary calls send them")
    ap.add_argument("--speculative", action="store_true",
                    help="also waves of speculative jobs on the diffusion model")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    report: dict[str, Any] = {"machine": machine_info(args.threads), "device": args.device,
                              "arrival": "each wave: all jobs submitted at t=0 to one Engine",
                              "progress": not args.no_progress, "models": {}}  # fmt: skip
    arms = [("model", False), ("model-ar", False)] + [("model", True)] * args.speculative
    for which, speculative in arms:
        gen = Generator.load(default_model_dir(which), device=args.device, dtype=args.dtype)
        rows = []
        name = f"{which} {gen.model.inference_dtype}{' speculative' if speculative else ''}"
        with Engine(gen, max_batch=max(levels)) as engine:
            wave(engine, 2, args.length, speculative=speculative)  # warm-up
            for n in levels:
                rows.append(wave(engine, n, args.length, not args.no_progress, speculative))
                log(f"{name} c{n}: {rows[-1]}")
        base = rows[0]["tokens_per_s"]
        for r in rows:
            r["tokens_per_s_over_c1"] = r["tokens_per_s"] / base
            r["wall_over_c1"] = r["wall_s"] / rows[0]["wall_s"]
        report["models"][name] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"engine_waves_{args.device.split(':')[0]}{'_unary' if args.no_progress else ''}.json"
    (out / name).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out / name}")
    return report


if __name__ == "__main__":
    main()
