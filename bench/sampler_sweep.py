"""Sampler settings sweep on the validation split: quality gates and tokens per forward for each
setting, per modality, so the model's `sampler_defaults` are chosen by measurement.

    python bench/sampler_sweep.py --model runs/stage2-bd [--ar-model runs/stage2-ar] \
        [--samples 8] [--out bench/results/sampler_sweep.json]

Each row is one `unmask eval` run (models/evaluate.py) restricted to one modality with the
setting's knobs; the AR baseline, when given, is run with the same temperature / top-p.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from unmask.models.evaluate import EvalConfig, evaluate_model

KEYS = {
    "text": [("samples", "dictionary_word_share"), ("samples", "repeated_3gram_share"),
             ("samples", "degenerate_samples"), ("samples", "tokens_per_forward")],
    "code": [("functions", "function_body_rate"), ("samples", "parse_rate"),
             ("samples", "tokens_per_forward")],
    "midi": [("samples", "pitch_class_overlap_transposed"),
             ("samples", "pitch_class_entropy_min_bits"), ("samples", "duration_overlap"),
             ("samples", "type_error_rate"), ("samples", "tokens_per_forward")],
}  # fmt: skip


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ar-model", default=None)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--modalities", default="text,code,midi")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench/results/sampler_sweep.json")
    args = ap.parse_args()
    rows = []
    for modality in args.modalities.split(","):
        for s in settings(args.quick):
            t0 = time.perf_counter()
            cfg = EvalConfig(
                model=args.model, ar_model=args.ar_model, corpus=args.corpus, split="val",
                modalities=(modality,), batches=1, t_samples=1, n_samples=args.samples,
                gen_length=args.gen_length, steps=args.gen_length // s["tokens_per_step"],
                temperature=s["temperature"], top_p=s["top_p"],
                position_score=s["position_score"], function_headers=args.samples,
                infill_rows=0, num_threads=args.threads, midi_reference_docs=20,
            )  # fmt: skip
            res = evaluate_model(cfg)["modalities"][modality]
            row = {"modality": modality, **s, "seconds": round(time.perf_counter() - t0, 1)}
            for where, key in KEYS[modality]:
                row[key] = (res.get(where) or {}).get(key)
                ar_where = "ar_" + where
                if res.get(ar_where):
                    row["ar_" + key] = res[ar_where].get(key)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
