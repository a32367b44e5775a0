"""A/B of the vocabulary head's rows per step, in process: waves of 1, 8 and 32 unary-style jobs
(progress=false) on one Engine, with the head over the positions a step samples (new, the code
as it is) and over every open position of the block (old: `SamplerState.read_positions`
answering None), interleaved so both arms see the same machine load.

    python bench/ab_head_rows.py [--rounds 2] [--length 128] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_waves import wave
from machine import machine_info

from unmask.engine.engine import Engine
from unmask.models import sampler
from unmask.models.generation import Generator

LEVELS = (1, 8, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    new = sampler.SamplerState.read_positions
    arms = {"new": new, "old": lambda self, n_open: None}
    rounds: dict[str, list[dict[int, float]]] = {arm: [] for arm in arms}
    with Engine(Generator.load(None), max_batch=max(LEVELS)) as engine:
        wave(engine, 2, args.length, False)  # warm-up
        try:
            for _ in range(args.rounds):
                for arm, fn in arms.items():
                    sampler.SamplerState.read_positions = fn
                    row = {n: wave(engine, n, args.length, False)["wall_s"] for n in LEVELS}
                    rounds[arm].append(row)
                    print(arm, {n: f"{s:.3f} s" for n, s in row.items()}, flush=True)
        finally:
            sampler.SamplerState.read_positions = new
    mean = {arm: {n: sum(r[n] for r in rs) / len(rs) for n in LEVELS} for arm, rs in rounds.items()}
    result = {"machine": machine_info(args.threads), "length": args.length, "rounds": rounds,
              "mean_wall_s": mean}  # fmt: skip
    out = Path(args.out) / "engine_head_rows_ab.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(mean), "->", out)


if __name__ == "__main__":
    main()
