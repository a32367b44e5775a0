"""The main job of `make demo`: generate a text, a code snippet and a MIDI file end to end with
the shipped default model on the embedded (in-process) Engine, and say where they are."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPTS = {
    "text": "It is a truth universally acknowledged, that",
    "code": "def read_config(path):\n",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unmask.demo", description=__doc__)
    parser.add_argument("--out", default="out", help="directory for the outputs (default: out)")
    parser.add_argument("--model", default=None, help="model directory (default: shipped)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    from unmask.engine.engine import SUCCEEDED, Engine
    from unmask.engine.request import GenerationRequest
    from unmask.models.generation import Generator, default_model_dir
    from unmask.models.sampler_params import SamplerParams

    model_dir = Path(args.model) if args.model else default_model_dir()
    generator = Generator.load(model_dir)
    print(
        f"loaded {model_dir} ({generator.model.num_parameters() / 1e6:.1f}M parameters, "
        f"{generator.meta.get('objective')}) in {time.perf_counter() - t0:.1f}s"
    )
    params = SamplerParams(gen_length=128, steps=32, block_length=32, use_cache="prefix",
                           temperature=0.8, top_p=0.95, seed=args.seed)  # fmt: skip
    requests = {
        "text": GenerationRequest("text", prompt=PROMPTS["text"], params=params),
        "code": GenerationRequest("code", prompt=PROMPTS["code"], params=params),
        "midi": GenerationRequest(
            "midi", params=SamplerParams(gen_length=256, steps=64, block_length=64,
                                         use_cache="prefix", temperature=0.9, seed=args.seed)),
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with Engine(generator) as engine:  # all three are batched together, step by step
        handles = {name: engine.submit(req) for name, req in requests.items()}
        results = {name: h.result(timeout=600) for name, h in handles.items()}
    failed = False
    for name, res in results.items():
        if res.status != SUCCEEDED:
            print(f"{name}: {res.status}: {res.error}")
            failed = True
            continue
        path = out / {"text": "sample.txt", "code": "sample.py", "midi": "sample.mid"}[name]
        if res.output_midi:
            path.write_bytes(res.output_midi)
        else:
            path.write_text(res.output_text, encoding="utf-8")
            print(f"--- {name} ---\n{res.output_text}\n")
        print(f"{name}: wrote {path}  usage={json.dumps(res.usage)}")
    print(f"done in {time.perf_counter() - t0:.1f}s; outputs in {out.resolve()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
