"""Markdown for the shipped model card (and README) from the measured JSON files: the recipe,
training throughput, the quality gates, the sampler sweeps behind the defaults and three
unedited samples per modality. Everything it prints comes from a file written by a benchmark or
`unmask eval`.

    python scripts/card_notes.py --eval docs/eval.json \
        --sweep bench/results/text_temperature.json bench/results/code_defaults.json \
        --speed bench/results/train_speed.json --samples out/ > notes.md

A sweep file is a list of `bench/sampler_sweep.py` rows, or {"what", "command", "cpu",
"modality", "rows"} (rows without a modality take the file's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _f(v, fmt=".3f") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return format(v, fmt)
    return str(v)


def gates_table(report: dict) -> str:
    rows = ["| gate | measured | target | met |", "|---|---|---|---|"]
    for name, g in report.get("gates", {}).items():
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        value = _f(g["value"])
        if g.get("nelbo") is not None and g["nelbo"] != g["value"]:  # infill: L2R NLL, NELBO
            value += f" (NELBO {_f(g['nelbo'])})"
        rows.append(f"| {name} | {value} | {g['op']} {_f(g['threshold'])} | {met} |")
    return "\n".join(rows)


def longer_gaps_table(report: dict) -> str:
    """Variable-length infill (not a gate: the issue sets no number): gaps longer than the
    text cut out of them, which a fill should end early with an end-of-span."""
    rows = []
    for m, r in report.get("modalities", {}).items():
        g = (r.get("infill") or {}).get("longer_gaps")
        if g:
            rows.append(f"| {m} | {g['rows']} | +{g['extra_slots']} | {_f(g['ends_early_rate'])} "
                        f"| {_f(g['mean_tokens_written'], '.1f')} | {_f(g['fixed_kept_rate'])} "
                        f"| {_f(g.get('end_of_span_nll'), '.2f')} |")  # fmt: skip
    if not rows:
        return ""
    head = [
        f"Variable-length infill: held-out windows whose gap is given "
        f"{report['config'].get('infill_gap', '?')} + extra slots for the text cut out of it; "
        "a fill that fits ends early with an end-of-span (EOS; the span's rest becomes PAD).",
        "",
        "| modality | gaps | extra slots | ended early | tokens written | fixed text kept "
        "| EOS NLL at the text's end (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows)


def likelihood_table(report: dict) -> str:
    rows = [
        "| modality | NELBO (nats/token) | AR NLL | ratio | left-to-right NLL | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in report.get("modalities", {}).items():
        nat, ar = r.get("nelbo_per_token"), r.get("ar_nll_per_token")
        ltr = r.get("left_to_right_nll_per_token")
        ratio = nat / ar if nat and ar else None
        ltr_ratio = ltr / ar if ltr and ar else None
        rows.append(f"| {m} | {_f(nat)} | {_f(ar)} | {_f(ratio)} | {_f(ltr)} | {_f(ltr_ratio)} |")
    rows += [
        "",
        "The NELBO averages over random unmasking orders (an upper bound on the NLL; the gate "
        "is set on it). The left-to-right NLL is exact: the likelihood of decoding each block "
        "left to right, one token per step — the default sampler's order for every modality "
        "(`block_order_nll` in models/block_diffusion.py). The infill gate is judged on it; the "
        "gap's NELBO is shown beside it.",
    ]
    return "\n".join(rows)


def speed_table(speed: dict) -> str:
    rows = [
        f"CPU: {speed['cpu']}, {speed['threads']} thread(s), torch {speed['torch']}, "
        f"{speed['model']} (`python bench/train_speed.py`):",
        "",
        "| objective / precision | tokens/s | × the previous recipe |",
        "|---|---|---|",
    ]
    rows += [f"| {r['row']} | {r['tok_s']:,.0f} | {r['vs_before']:.2f} |" for r in speed["results"]]
    return "\n".join(rows)


def sweep_section(data: list[dict] | dict) -> str:
    """One sweep file: what it measured and how (when the file says), then its table."""
    if isinstance(data, list):
        return sweep_table(data)
    head = [data[k] + ("." if k == "what" else "") for k in ("what",) if data.get(k)]
    if data.get("command"):
        head.append(f"`{data['command']}`")
    if data.get("cpu"):
        head.append(f"CPU: {data['cpu']}.")
    rows = [{"modality": data.get("modality", "?"), **r} for r in data["rows"]]
    return (" ".join(head) + "\n\n" if head else "") + sweep_table(rows)


def sweep_table(rows: list[dict]) -> str:
    keys = sorted({k for r in rows for k in r} - {"modality", "seconds"})
    lead = ["position_score", "tokens_per_step", "temperature", "top_p"]
    keys = lead + [k for k in keys if k not in lead]
    out = []
    for modality in dict.fromkeys(r["modality"] for r in rows):
        sub = [r for r in rows if r["modality"] == modality]
        cols = [k for k in keys if any(k in r for r in sub)]
        out += [f"**{modality}**", "", "| " + " | ".join(cols) + " |",
                "|" + "---|" * len(cols)]  # fmt: skip
        out += ["| " + " | ".join(_f(r.get(k), ".2f") for k in cols) + " |" for r in sub]
        out.append("")
    return "\n".join(out)


def samples_text(directory: Path) -> str:
    out = []
    for name, suffix in (("text", ".txt"), ("code", ".py")):
        for seed, stem in enumerate(["sample", "sample-seed1", "sample-seed2"]):
            p = directory / (stem + suffix)
            if p.exists():
                fence = "text"  # unedited output: no formatter may touch it
                out += [
                    f"{name}, seed {seed}:",
                    "",
                    f"```{fence}",
                    p.read_text().rstrip(),
                    "```",
                    "",
                ]
    notes = directory / "midi-notes.txt"
    if notes.exists():
        out += ["MIDI (first notes of each file, pitch/beats):", "", "```",
                notes.read_text().rstrip(), "```", ""]  # fmt: skip
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--sweep", nargs="*", default=[], help="sweep JSON files, in order")
    ap.add_argument("--speed", default=None)
    ap.add_argument("--samples", default=None, help="directory written by `make demo`")
    ap.add_argument("--recipe", default=None, help="markdown file describing the training")
    args = ap.parse_args()
    report = json.loads(Path(args.eval).read_text())
    parts = []
    if args.recipe:
        parts += [Path(args.recipe).read_text().rstrip(), ""]
    parts += ["## Quality gates (held-out test split, default settings, `unmask eval`)", "",
              likelihood_table(report), "", gates_table(report), ""]  # fmt: skip
    longer = longer_gaps_table(report)
    if longer:
        parts += [longer, ""]
    if args.speed and Path(args.speed).exists():
        parts += [
            "## Training throughput",
            "",
            speed_table(json.loads(Path(args.speed).read_text())),
            "",
        ]
    sweeps = [Path(p) for p in args.sweep if Path(p).exists()]
    if sweeps:
        parts += ["## Sampler sweeps behind the defaults (validation split)", ""]
        for path in sweeps:
            parts += [sweep_section(json.loads(path.read_text())), ""]
    if args.samples:
        parts += [
            "## Unedited samples (`make demo`, seeds 0–2)",
            "",
            samples_text(Path(args.samples)),
        ]
    print("\n".join(parts))


if __name__ == "__main__":
    main()
