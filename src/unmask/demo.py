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
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    parser.add_argument("--samples", type=int, default=3, help="samples per modality (3)")
    args = parser.parse_args(argv)

    from unmask.client import Client
    from unmask.errors import UnmaskError
    from unmask.service.server import ServerThread
    from unmask.settings import Settings

    t0 = time.perf_counter()
    settings = Settings.from_env().with_overrides(model=args.model or None, broker_url="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = range(args.seed, args.seed + args.samples)
    # only the length and the seed: every other sampler knob is the model's own default for the
    # modality (its config's sampler_defaults, chosen by measurement; see the model card)
    with ServerThread(settings) as server, Client(f"127.0.0.1:{server.port}") as client:
        print(
            f"embedded server on 127.0.0.1:{server.port} ready in {time.perf_counter() - t0:.1f}s"
        )
        calls = {}
        for seed in seeds:
            calls[("text", seed)] = lambda s=seed: client.generate(
                PROMPTS["text"], modality="text", gen_length=128, seed=s
            )
            calls[("code", seed)] = lambda s=seed: client.generate(
                PROMPTS["code"], modality="code", gen_length=128, seed=s
            )
            calls[("midi", seed)] = lambda s=seed: client.midi(
                time_signature="4/4", programs=[73], n_bars=8, gen_length=256, seed=s
            )
        # concurrent calls: the server's Engine batches their denoising steps together
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = {key: pool.submit(call) for key, call in calls.items()}
        failed = False
        midi_notes = []
        for (name, seed), fut in futures.items():
            try:
                gen = fut.result()
            except UnmaskError as exc:
                print(f"{name} (seed {seed}): failed: {exc}")
                failed = True
                continue
            stem = "sample" if seed == args.seed else f"sample-seed{seed}"
            suffix = {"text": ".txt", "code": ".py", "midi": ".mid"}[name]
            path = out / (stem + suffix)
            if name == "midi":
                path.write_bytes(gen.midi)
                notes = _describe_midi(gen.midi)
                midi_notes.append(f"seed {seed}: {notes}")
                print(f"--- midi, seed {seed} ---\n{notes}\n")
            else:
                path.write_text(gen.text, encoding="utf-8")
                print(f"--- {name}, seed {seed} ---\n{gen.text}\n")
            print(f"{name} (seed {seed}): wrote {path}  usage={json.dumps(gen.usage)}\n")
        if midi_notes:
            (out / "midi-notes.txt").write_text("\n".join(midi_notes) + "\n")
    print(f"done in {time.perf_counter() - t0:.1f}s; outputs in {out.resolve()}")
    return 1 if failed else 0


def _describe_midi(data: bytes) -> str:
    """The first notes of a MIDI file as names (C4, E4, ...), so the demo shows the music."""
    from unmask.models.music_metrics import read_notes

    names = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
    notes = sorted(read_notes(data), key=lambda n: (n.start, n.track))
    shown = " ".join(f"{names[n.pitch % 12]}{n.pitch // 12 - 1}/{n.beats:g}" for n in notes[:32])
    return f"{len(notes)} notes (pitch/beats): {shown}{' ...' if len(notes) > 32 else ''}"


if __name__ == "__main__":
    sys.exit(main())
