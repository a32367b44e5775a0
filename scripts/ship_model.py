"""Copy a trained model directory into the package (without its training state) and record
evaluation results in its config and model card.

    python scripts/ship_model.py runs/diffusion src/unmask/assets/model [--eval eval.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from unmask.models import checkpoint

MAX_BYTES = 50 * 1024 * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--eval", default=None, help="JSON from `unmask eval --json` to record")
    ap.add_argument("--name", default=None)
    ap.add_argument("--corpus", default="data/corpus", help="for the sources and licences")
    ap.add_argument("--note", default="", help="text for the limitations section")
    ap.add_argument("--note-file", default=None, help="markdown file appended to the card")
    ap.add_argument("--sampler-defaults", default=None, help="JSON file: modality -> knobs")
    args = ap.parse_args()
    model, vocab, meta = checkpoint.load(args.src)
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "model", "parameters",
                                                       "weights_dtype", "vocab_content_hash")}  # fmt: skip
    if args.name:
        meta["name"] = args.name
    manifest = Path(args.corpus) / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        rows = [f"| {name} | {s['modality']} | {s['splits']['train']['documents']:,} | "
                f"{s['splits']['train']['tokens']:,} | {s['licence']} |"
                for name, s in m["sources"].items()]  # fmt: skip
        meta["data"] = (
            "Corpus built by `unmask data build` from installed packages only (no downloads); "
            "train split:\n\n| source | modality | documents | tokens | licence |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\nThe Essen folk songs are "
            "licensed for non-commercial research use only: so is this model's MIDI side."
        )
    notes = args.note + "\n" if args.note else ""
    if args.note_file:
        notes += Path(args.note_file).read_text() + "\n"
    if args.sampler_defaults:
        meta["sampler_defaults"] = json.loads(Path(args.sampler_defaults).read_text())
    meta["notes"] = notes
    if args.eval:
        report = json.loads(Path(args.eval).read_text())
        meta["notes"] = notes + (
            "\n## Held-out evaluation (`unmask eval`)\n\n```json\n"
            + json.dumps(report.get("modalities", report), indent=1)[:6000]
            + "\n```\n"
        )
    dst = Path(args.dst)
    if dst.exists():
        shutil.rmtree(dst)
    checkpoint.save(dst, model, vocab, meta, weights_dtype=meta.get("weights_dtype", "float32"))
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"{dst} is {size / 1e6:.1f} MB > 50 MB"
    print(f"shipped {args.src} -> {dst} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
