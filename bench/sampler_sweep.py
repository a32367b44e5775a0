"""Sampler settings sweep on the validation split: quality gates and tokens per forward for each
setting, per modality, so the model's `sampler_defaults` are chosen by measurement.

    python bench/sampler_sweep.py --model runs/stage2-bd [--ar-model runs/stage2-ar] \
        [--samples 8] [--out bench/results/sampler_sweep.json]

Each row is one `unmask eval` run (models/evaluate.py) restricted to one modality with the
setting's knobs; the AR baseline, when given, is run with the same temperature / top-p.

`--grid grid.json` replaces the built-in grid: either a list of settings (every modality) or a
mapping modality -> list of settings. A setting holds any of the knobs in GRID_KNOBS (a knob left
out keeps the model's own default for the modality), plus optional "samples", "headers" (code:
held-out function headers to complete; default: samples), "seed", "prompt_tokens" (content ids
of a held-out document used as each sample's prompt; default 16, 0 = from scratch) that override
the command line for that row, and "ar": false to skip the AR baseline on that row, e.g.

    {"midi": [{"position_score": "left_to_right", "tokens_per_step": 1,
               "temperature": 1.3, "top_p": 0.95, "samples": 24}],
     "code": [{"temperature": 0.6, "top_p": 0.9, "top_k": 20}]}

`--ar-modalities code` limits the AR baseline to those modalities (default: all of them).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

from unmask.models.evaluate import EvalConfig, evaluate_model
from unmask.models.sampler_params import SamplerParams

KEYS = {
    "text": [("samples", "dictionary_word_share"), ("samples", "repeated_3gram_share"),
             ("samples", "degenerate_samples"), ("samples", "tokens_per_forward")],
    "code": [("functions", "function_body_rate"), ("samples", "parse_rate"),
             ("samples", "tokens_per_forward")],
    "midi": [("samples", "pitch_class_overlap_transposed"),
             ("samples", "pitch_class_entropy_min_bits"), ("samples", "duration_overlap"),
             ("samples", "type_error_rate"), ("samples", "tokens_per_forward")],
}  # fmt: skip
# reported with --grid only (the built-in grid's rows keep their original columns)
EXTRA_KEYS = {
    "text": [],
    "code": [("functions", "n")],  # n = function headers completed
    "midi": [("samples", "pitch_class_entropy_bits"), ("samples", "valid_rate"),
             ("samples", "new_notes_rate"), ("samples", "generated_notes"), ("samples", "n")],
}  # fmt: skip
# knobs EvalConfig takes directly, and SamplerParams fields it does not (set on each generation)
EVAL_KNOBS = ("position_score", "temperature", "top_p", "block_length", "threshold", "use_cache")
PARAM_KNOBS = ("top_k", "threshold_factor", "remask_budget", "remask_threshold")
GRID_KNOBS = ("tokens_per_step", *EVAL_KNOBS, *PARAM_KNOBS)
ROW_OPTIONS = ("samples", "headers", "seed", "prompt_tokens", "ar")


@dataclasses.dataclass
class SweepEvalConfig(EvalConfig):
    """EvalConfig plus SamplerParams knobs that `unmask eval` leaves at the model's default."""

    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def sampler_params(self, index: int) -> SamplerParams:
        p = super().sampler_params(index)
        if not self.params:
            return p
        unset = tuple(u for u in p.unset if u not in self.params)
        return dataclasses.replace(p, **self.params, unset=unset)


def settings(quick: bool) -> list[dict]:
    scores = ["left_to_right", "probability"]
    tps = [1, 2]
    temps = [(0.0, 1.0), (0.8, 0.9), (1.0, 0.9)]
    if quick:  # the settings that matter most, one change at a time from (ltr, 1, 0.8, 0.9)
        return [
            {"position_score": s, "tokens_per_step": k, "temperature": t, "top_p": p}
            for s, k, t, p in [
                ("left_to_right", 1, 0.0, 1.0), ("left_to_right", 1, 0.8, 0.9),
                ("left_to_right", 1, 1.0, 0.9), ("left_to_right", 2, 0.8, 0.9),
                ("probability", 1, 0.8, 0.9),
            ]
        ]  # fmt: skip
    return [
        {"position_score": s, "tokens_per_step": k, "temperature": t, "top_p": p}
        for s, k, (t, p) in itertools.product(scores, tps, temps)
    ]


def load_grid(path: str | Path, modalities: list[str]) -> dict[str, list[dict]]:
    """modality -> settings from a grid file (a list for every modality, or a mapping)."""
    data = json.loads(Path(path).read_text())
    grid = {m: data for m in modalities} if isinstance(data, list) else data
    if not isinstance(grid, dict):
        raise ValueError(f"{path}: a list of settings or a mapping modality -> settings")
    out: dict[str, list[dict]] = {}
    for m in modalities:
        rows = grid.get(m, [])
        if not isinstance(rows, list):
            raise ValueError(f"{path}: {m} must map to a list of settings")
        for s in rows:
            bad = [k for k in s if k not in GRID_KNOBS + ROW_OPTIONS]
            if bad:
                raise ValueError(f"{path}: unknown keys {bad}; allowed: {GRID_KNOBS + ROW_OPTIONS}")
        out[m] = rows
    return out


def eval_config(args: argparse.Namespace, modality: str, s: dict, ar: bool) -> SweepEvalConfig:
    """The evaluation of one row: one modality, the setting's knobs, the validation split."""
    samples = s.get("samples", args.samples)
    tps = s.get("tokens_per_step")
    return SweepEvalConfig(
        model=args.model, ar_model=args.ar_model if ar else None, corpus=args.corpus,
        split="val", modalities=(modality,), batches=1, t_samples=1, n_samples=samples,
        gen_length=args.gen_length, steps=-(-args.gen_length // tps) if tps else None,
        function_headers=s.get("headers", samples), infill_rows=0, num_threads=args.threads,
        midi_reference_docs=20, seed=s.get("seed", args.seed),
        prompt_tokens=s.get("prompt_tokens", 16),
        params={k: s[k] for k in PARAM_KNOBS if k in s},
        **{k: s[k] for k in EVAL_KNOBS if k in s},
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ar-model", default=None)
    ap.add_argument("--ar-modalities", default=None, help="comma list (default: all)")
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--modalities", default="text,code,midi")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--grid", default=None, help="JSON file of settings (see the module doc)")
    ap.add_argument("--out", default="bench/results/sampler_sweep.json")
    args = ap.parse_args()
    modalities = args.modalities.split(",")
    ar_modalities = args.ar_modalities.split(",") if args.ar_modalities else modalities
    if args.grid:
        grid = load_grid(args.grid, modalities)
    else:
        grid = {m: settings(args.quick) for m in modalities}
    rows = []
    for modality in modalities:
        for s in grid[modality]:
            t0 = time.perf_counter()
            cfg = eval_config(args, modality, s, ar=modality in ar_modalities and s.get("ar", True))
            res = evaluate_model(cfg)["modalities"][modality]
            row = {"modality": modality, **s, "seconds": round(time.perf_counter() - t0, 1)}
            keys = KEYS[modality] + (EXTRA_KEYS[modality] if args.grid else [])
            for where, key in keys:
                row[key] = (res.get(where) or {}).get(key)
                ar_where = "ar_" + where
                if res.get(ar_where):
                    row["ar_" + key] = res[ar_where].get(key)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.grid:  # long custom sweeps: keep what is done
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
