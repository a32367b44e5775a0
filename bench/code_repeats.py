"""What a lower code temperature costs: repeated word 3-grams (the text gate's loop measure) and
the function-body rate of completions of held-out function headers, per model and temperature.
The code gate counts function bodies only, and a completion that loops can still parse.

    python bench/code_repeats.py [--headers 20] [--temperatures 0.8,0.5,0.2] \
        [--model src/unmask/assets/model] [--ar-model src/unmask/assets/model-ar] \
        [--split val] [--out bench/results/code_repeats.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info

from unmask.models import quality as q
from unmask.models.evaluate import held_out_headers, load_split
from unmask.models.generation import Generator
from unmask.models.sampler_params import MODEL_DEFAULTABLE, SamplerParams

# the model's defaults for every knob but the two swept here
UNSET = tuple(k for k in MODEL_DEFAULTABLE if k not in ("temperature", "top_p"))


def measure(gen: Generator, headers: list[str], temperature: float, top_p: float) -> dict:
    repeats, bodies = [], []
    for i, header in enumerate(headers):
        params = SamplerParams(gen_length=96, seed=i, temperature=temperature, top_p=top_p,
                               unset=UNSET)  # fmt: skip
        out = gen.generate("code", header, params).output
        completion = out[len(header) :] if out.startswith(header) else out
        repeats.append(q.repeated_ngram_share(completion) or 0.0)
        bodies.append(q.function_with_body(header, completion))
    return {"temperature": temperature, "top_p": top_p, "headers": len(headers),
            "repeated_3gram_share": sum(repeats) / len(repeats),
            "function_body_rate": q.share(bodies)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="src/unmask/assets/model")
    ap.add_argument("--ar-model", default="src/unmask/assets/model-ar")
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--split", default="val")
    ap.add_argument("--headers", type=int, default=20)
    ap.add_argument("--temperatures", default="0.8,0.5,0.2")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/code_repeats.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    docs = load_split(Path(args.corpus), args.split)["code"]
    rows = []
    for label, path in (("block diffusion", args.model), ("AR", args.ar_model)):
        gen = Generator.load(path, dtype="float32")  # fp32, as `unmask eval` measures
        headers = held_out_headers(docs, gen.vocab, args.headers)
        for t in (float(x) for x in args.temperatures.split(",")):
            row = {"model": label, **measure(gen, headers, t, args.top_p)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"machine": machine_info(args.threads), "split": args.split, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
