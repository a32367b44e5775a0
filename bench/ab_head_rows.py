"""A/B of the vocabulary head's rows per step, in process: waves of 1, 8 and 32 unary-style jobs
(progress=false) on one Engine, with the head over the positions a step samples (new, the code
as it is) and over every open position of the block (old: `SamplerState.read_positions`
answering None), interleaved so both arms see the same machine load.

    python bench/ab_head_rows.py [--rounds 2] [--length 128] [--out bench/results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_waves import ab_args, ab_waves
from machine import machine_info

from unmask.engine.engine import Engine
from unmask.models import sampler
from unmask.models.generation import Generator

LEVELS = (1, 8, 32)


def main() -> None:
    args = ab_args(__doc__)
    new = sampler.SamplerState.read_positions

    def arm(fn):
        return lambda: setattr(sampler.SamplerState, "read_positions", fn)

    arms = {"new": arm(new), "old": arm(lambda self, n_open: None)}
    with Engine(Generator.load(None), max_batch=max(LEVELS)) as engine:
        try:
            ab = ab_waves(engine, arms, args.rounds, args.length, LEVELS)
        finally:
            sampler.SamplerState.read_positions = new
    result = {"machine": machine_info(args.threads), "length": args.length, **ab}
    out = Path(args.out) / "engine_head_rows_ab.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(ab["mean_wall_s"]), "->", out)


if __name__ == "__main__":
    main()
