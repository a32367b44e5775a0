"""Masked-diffusion sampler variants vs the autoregressive baseline: speed and quality, one run.

Same prompts (held-out text, code and MIDI), same machine, same run; the AR baseline decodes with
its KV cache. For each variant and modality:
  speed    generated tokens/s (generated tokens only), latency to the first committed block
           (AR: first token), total latency, NFE and tokens per forward, at batch 1 (one job at a
           time) and batch 16 (16 jobs through the Engine, which batches denoising steps; AR jobs
           have no canvas to batch and run one after another — reported as such);
  quality  NLL per token of the continuation under a judge (an AR model; `--judge DIR`, default
           the shipped AR baseline — which then scores its own samples: read the AR row with
           that in mind), unigram entropy (degenerate repetition), code: share that parses
           (the longest complete-line prefix), MIDI: share with >= 1 new note, token-type error
           rate, pitch-class and duration overlap with held-out pieces.
Writes JSON and one quality-vs-latency PNG per modality with the Pareto front.

    python bench/sampler_vs_ar.py [--length 128] [--prompts 4] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unmask.corpus.shards import load_split
from unmask.engine.engine import SUCCEEDED, Engine
from unmask.engine.request import GenerationRequest
from unmask.models import music_metrics as mm
from unmask.models.evaluate import parsing_prefix, unigram_entropy
from unmask.models.generation import Generator, default_model_dir
from unmask.models.sampler_params import SamplerParams

MODALITIES = ("text", "code", "midi")


def variants(n: int) -> dict[str, SamplerParams | None]:
    P = SamplerParams
    b32 = dict(gen_length=n, block_length=32, use_cache="prefix")
    return {
        "AR (KV cache)": None,
        "steps=L, block 32": P(steps=n, **b32),
        "steps=L/2, block 32": P(steps=n // 2, **b32),
        "steps=L/4, block 32": P(steps=n // 4, **b32),
        "steps=L/4, block 64": P(gen_length=n, steps=n // 4, block_length=64, use_cache="prefix"),
        "steps=L/4, full canvas": P(gen_length=n, steps=n // 4),
        "threshold 0.9, block 32": P(steps=n, threshold=0.9, **b32),
        "threshold 0.7, block 32": P(steps=n, threshold=0.7, **b32),
        "steps=L/4, block 32, remask": P(
            steps=n // 4, remask_budget=n // 8, remask_threshold=0.2, **b32
        ),  # fmt: skip
        "steps=L/4, block 32, no cache": P(gen_length=n, steps=n // 4, block_length=32),
    }


def judge_nll(judge: Generator, head: list[int], new: list[int]) -> float | None:
    if not new:
        return None
    ids = torch.tensor([head + new])[:, : judge.max_len]
    logits, _ = judge.model(ids)
    logp = logits[0, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return float(nll[len(head) - 1 :].mean())


class Timer:
    """Time to the first committed block (diffusion) or first token (AR) via the step hook."""

    def __init__(self, is_ar: bool) -> None:
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.is_ar = is_ar

    def __call__(self, event: Any) -> None:
        if self.first is None and (self.is_ar or event.block > 0):
            self.first = time.perf_counter() - self.t0


def quality(modality: str, gen: Generator, judge: Generator, head: list[int], prompt: list[int],
            out: Any, ref: dict) -> dict[str, Any]:  # fmt: skip
    new = gen.vocab.strip_specials(out.generated_ids)  # content only, up to the first EOS
    q: dict[str, Any] = {"nll": judge_nll(judge, head, new), "entropy": unigram_entropy(new)}
    if modality == "code":
        text = gen.vocab.decode(prompt + new, "code") if new else ""
        q["parse"] = float(parsing_prefix(text) > len(gen.vocab.decode(prompt, "code")))
    if modality == "midi":
        q["type_error_rate"] = gen.vocab.count_midi_type_errors(new) / max(1, len(new))
        try:
            before = len(mm.read_notes(gen.vocab.decode(prompt, "midi"))) if prompt else 0
        except Exception:
            before = 0
        data = out.output if isinstance(out.output, bytes) else b""
        notes = mm.read_notes(data) if mm.has_notes(data) else []
        q["valid"] = float(len(notes) > before)
        q["notes"] = notes[before:]
    return q


def run_variant(name: str, params: SamplerParams | None, diff: Generator, ar: Generator,
                judge: Generator, prompts: dict[str, list[list[int]]], n: int, batch: int,
                ref: dict) -> dict[str, Any]:  # fmt: skip
    gen = ar if params is None else diff
    p = params or SamplerParams(gen_length=n, steps=n)
    rows: dict[str, Any] = {}
    for modality, plist in prompts.items():
        lat, first, toks, nfe, qs = [], [], [], [], []
        gen.run(gen.prepare_from_ids(modality, plist[0], p))  # warm-up
        for ids in plist:
            job = gen.prepare_from_ids(modality, ids, p)
            timer = Timer(gen.is_ar)
            try:
                out = gen.run(job, on_step=timer)
            except Exception:  # e.g. MIDI with no playable notes: counts as invalid
                qs.append({"valid": 0.0, "nll": None, "entropy": 0.0, "notes": []})
                continue
            total = time.perf_counter() - timer.t0
            lat.append(total)
            first.append(timer.first if timer.first is not None else total)
            toks.append(len(out.generated_ids))
            nfe.append(out.nfe)
            qs.append(quality(modality, gen, judge, gen.header(modality) + ids, ids, out, ref))
        row = {
            "tokens_per_s_b1": sum(toks) / max(sum(lat), 1e-9),
            "latency_s": sum(lat) / max(len(lat), 1),
            "first_block_s": sum(first) / max(len(first), 1),
            "nfe": sum(nfe) / max(len(nfe), 1),
            "tokens_per_forward": sum(toks) / max(sum(nfe), 1),
            "judge_nll": _mean([q["nll"] for q in qs]),
            "entropy_bits": _mean([q["entropy"] for q in qs]),
        }
        if modality == "code":
            row["parse_rate"] = _mean([q.get("parse") for q in qs])
        if modality == "midi":
            row["valid_rate"] = _mean([q.get("valid") for q in qs])
            row["type_error_rate"] = _mean([q.get("type_error_rate") for q in qs])
            notes = [x for q in qs for x in q.get("notes", [])]
            if notes and ref.get("midi"):
                row["pitch_class_overlap"] = mm.overlap_area(
                    mm.pitch_class_histogram(notes), mm.pitch_class_histogram(ref["midi"])
                )
                row["duration_overlap"] = mm.overlap_area(
                    mm.duration_histogram(notes), mm.duration_histogram(ref["midi"]))  # fmt: skip
        row["tokens_per_s_b16"] = batch16(gen, modality, plist, p, batch)
        rows[modality] = row
    return rows


def batch16(gen: Generator, modality: str, plist: list[list[int]], p: SamplerParams,
            batch: int) -> float:  # fmt: skip
    """Generated tokens/s with `batch` jobs submitted to one Engine at once."""
    vocab = gen.vocab
    reqs = []
    for i in range(batch):
        ids = plist[i % len(plist)]
        params = SamplerParams.from_dict({**p.to_dict(), "seed": i})
        if modality == "midi":
            reqs.append(GenerationRequest("midi", midi=b"", params=params))
        else:
            reqs.append(GenerationRequest(modality, prompt=vocab.decode(ids, modality),
                                          params=params))  # fmt: skip
    with Engine(gen, max_batch=batch) as engine:
        t = time.perf_counter()
        results = [h.result(timeout=1800) for h in [engine.submit(r) for r in reqs]]
        wall = time.perf_counter() - t
    toks = sum(r.usage.get("generated_tokens", 0) for r in results if r.status == SUCCEEDED)
    return toks / wall


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not dominated in (lower latency, lower NLL)."""
    front, best = [], float("inf")
    for x, y, name in sorted(points):
        if y < best:
            front.append((x, y, name))
            best = y
    return front


def plot(rows: dict[str, dict], modality: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r[modality]["latency_s"], r[modality]["judge_nll"], name)
           for name, r in rows.items() if r[modality]["judge_nll"] is not None]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x, y, name in pts:
        ax.scatter(x, y, color="tab:red" if name.startswith("AR") else "tab:blue")
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto(pts)
    ax.plot([f[0] for f in front], [f[1] for f in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("latency per generation, batch 1 (s)")
    ax.set_ylabel("judge NLL per token (lower is better)")
    ax.set_title(f"{modality}: quality vs latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--ar-model", default=str(default_model_dir("model-ar")))
    ap.add_argument("--judge", default=None, help="judge AR model dir (default: --ar-model)")
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    diff, ar = Generator.load(args.model), Generator.load(args.ar_model)
    judge = Generator.load(args.judge) if args.judge else ar
    test = load_split(args.corpus, "test")
    prompts = {m: [[int(i) for i in d[: args.prompt_tokens]]
                   for d in [d for d in test[m] if len(d) > args.prompt_tokens][: args.prompts]]
               for m in MODALITIES if m in test}  # fmt: skip
    ref = {"midi": [n for d in list(test.get("midi", []))[:30]
                    for n in mm.read_notes(diff.vocab.decode([int(i) for i in d], "midi"))]}  # fmt: skip
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    for name, params in variants(args.length).items():
        rows[name] = run_variant(name, params, diff, ar, judge, prompts, args.length,
                                 args.batch, ref)  # fmt: skip
        log(f"{name:32s} " + "  ".join(
            f"{m}: {r['tokens_per_s_b1']:.0f} tok/s b1, {r['tokens_per_s_b16']:.0f} b16, "
            f"nll {r['judge_nll'] if r['judge_nll'] is None else round(r['judge_nll'], 2)}"
            for m, r in rows[name].items()))  # fmt: skip
    for m in prompts:
        plot(rows, m, out / f"quality_vs_latency_{m}.png")
    ar_b1 = {m: rows["AR (KV cache)"][m]["tokens_per_s_b1"] for m in prompts}
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_threads": args.threads, "torch": torch.__version__},
        "models": {"diffusion": args.model, "ar": args.ar_model, "judge": args.judge or args.ar_model},
        "length": args.length, "prompts_per_modality": args.prompts, "batch": args.batch,
        "variants": rows,
        "speedup_vs_ar_b1": {name: {m: r[m]["tokens_per_s_b1"] / ar_b1[m] for m in prompts}
                             for name, r in rows.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    (out / "sampler_vs_ar.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out / 'sampler_vs_ar.json'} in {report['wall_s']}s")
    return report


if __name__ == "__main__":
    main()
