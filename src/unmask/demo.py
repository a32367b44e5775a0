"""The main job of `make demo`: start the embedded gRPC server (local dispatcher, shipped
default model) and, through the Python gRPC client, generate a text, a code snippet and a MIDI
file; say where they are."""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = {
    "text": "It is a truth universally acknowledged, that",
    "code": "def read_config(path):\n",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unmask.demo", description=__doc__)
    parser.add_argument("--out", default="out", help="directory for the outputs (default: out)")
    parser.add_argument("--model", default="", help="model directory (default: shipped)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from unmask.client import Client
    from unmask.errors import UnmaskError
    from unmask.service.server import ServerThread
    from unmask.settings import Settings

    t0 = time.perf_counter()
    settings = Settings.from_env().with_overrides(model=args.model or None, broker_url="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    knobs = dict(gen_length=128, steps=32, block_length=32, cache="prefix", temperature=0.8,
                 top_p=0.95, seed=args.seed)  # fmt: skip
    with ServerThread(settings) as server, Client(f"127.0.0.1:{server.port}") as client:
        print(
            f"embedded server on 127.0.0.1:{server.port} ready in {time.perf_counter() - t0:.1f}s"
        )
        calls = {
            "text": lambda: client.generate(PROMPTS["text"], modality="text", **knobs),
            "code": lambda: client.generate(PROMPTS["code"], modality="code", **knobs),
            "midi": lambda: client.midi(time_signature="4/4", programs=[73], n_bars=8,
                                        gen_length=256, steps=64, block_length=64,
                                        cache="prefix", temperature=0.9, seed=args.seed),
        }  # fmt: skip
        # concurrent calls: the server's Engine batches their denoising steps together
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = {name: pool.submit(call) for name, call in calls.items()}
        failed = False
        for name, fut in futures.items():
            try:
                gen = fut.result()
            except UnmaskError as exc:
                print(f"{name}: failed: {exc}")
                failed = True
                continue
            path = out / {"text": "sample.txt", "code": "sample.py", "midi": "sample.mid"}[name]
            if name == "midi":
                path.write_bytes(gen.midi)
            else:
                path.write_text(gen.text, encoding="utf-8")
                print(f"--- {name} ---\n{gen.text}\n")
            print(f"{name}: wrote {path}  usage={json.dumps(gen.usage)}")
    print(f"done in {time.perf_counter() - t0:.1f}s; outputs in {out.resolve()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
