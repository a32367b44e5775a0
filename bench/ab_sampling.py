"""A/B of token sampling, in process: waves of 1, 8 and 32 unary-style jobs (progress=false) on
one Engine, with the sampler as it is (the exponential race in float32: argmax p_i / -log u_i,
nucleus filter in float32) and with the method it replaced (Gumbel-max in float64: logits,
filter and a Gumbel variate per id, two logs each), interleaved so both arms see the same
machine load. Both arms draw one uniform per id from each job's own generator, one call per
job; the old arm runs today's nucleus filter (`top_p_keep`) in float64, not the old one. Also
the sampling of one Engine step alone: 32 rows of the shipped vocabulary, both methods.

    python bench/ab_sampling.py [--rounds 2] [--length 128] [--out bench/results]

The arms' tokens differ (float32 vs float64 noise; the distribution is the same:
tests/test_sampler.py checks the frequencies); the jobs' lengths are fixed (128 tokens, EOS
aside), so the waves do the same work.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_waves import ab_args, ab_waves
from machine import machine_info

from unmask.models import sampler
from unmask.models.generation import Generator

LEVELS = (1, 8, 32)


def gumbel_max(logits, temperature, top_k, top_p, uniforms):
    """The replaced method: float64 logits and nucleus, a Gumbel variate per id."""
    z = sampler.filter_top_p(sampler.filter_top_k(logits.double() / temperature, top_k), top_p)
    u = uniforms.to(torch.float64).clamp(min=torch.finfo(torch.float64).tiny, max=1 - 2**-53)
    return (z - torch.log(-torch.log(u))).argmax(dim=-1)


def gumbel_noise(rows, vocab_size, generator):
    return torch.rand(rows, vocab_size, generator=generator, dtype=torch.float64)


ARMS = {  # (sample, noise) for `sampler.sample_with_noise` and `sampler.noise_for`
    "exponential_race_f32": (sampler.sample_with_noise, sampler.noise_for),
    "gumbel_max_f64": (gumbel_max, gumbel_noise),
}


def use(arm: str) -> None:
    sampler.sample_with_noise, sampler.noise_for = ARMS[arm]


def step_sampling_ms(vocab_size: int, rows: int = 32, reps: int = 50) -> dict[str, float]:
    """One step's sampling of `rows` jobs (one row each, like the Engine's), ms, both arms."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab_size, generator=g) * 3
    gens = [torch.Generator().manual_seed(i) for i in range(rows)]
    out = {}
    try:
        for arm in list(ARMS) * 2:  # the later of two runs stands
            use(arm)
            t = time.perf_counter()
            for _ in range(reps):
                u = torch.cat([sampler.noise_for(1, vocab_size, x) for x in gens])
                sampler.sample_with_noise(logits, 0.8, 0, 0.9, u)
            out[arm] = (time.perf_counter() - t) / reps * 1e3
    finally:
        use("exponential_race_f32")
    return out


def main() -> None:
    args = ab_args(__doc__)
    from unmask.engine.engine import Engine

    generator = Generator.load(None)
    micro = step_sampling_ms(generator.model.config.vocab_size)
    print("one step's sampling, 32 rows (ms):", {k: round(v, 2) for k, v in micro.items()})
    arms = {arm: (lambda a=arm: use(a)) for arm in ARMS}
    with Engine(generator, max_batch=max(LEVELS)) as engine:
        try:
            ab = ab_waves(engine, arms, args.rounds, args.length, LEVELS)
        finally:
            use("exponential_race_f32")
    ratio = {arm: {"wall_c8_over_c1": m[8] / m[1], "tokens_per_s_c32_over_c1": 32 * m[1] / m[32]}
             for arm, m in ab["mean_wall_s"].items()}  # fmt: skip
    result = {"machine": machine_info(args.threads), "length": args.length,
              "step_sampling_ms_32_rows": micro, **ab, "ratios": ratio}  # fmt: skip
    out = Path(args.out) / "engine_sampling_ab.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(ab["mean_wall_s"]), json.dumps(ratio), "->", out)


if __name__ == "__main__":
    main()
