"""The shipped block-diffusion model vs the AR baseline: speed and quality, same prompts, one run.

Both models run at their own defaults (config.json `sampler_defaults`: the same temperature and
top_p per modality); the diffusion variants change only how many tokens a forward may commit:
the model's default (1 token per step, left to right), a fixed 2 or 4 per step (block 4 is the
physical limit), Fast-dLLM's factor rule at several factors, a probability threshold, and
self-speculative decoding (models/speculative.py: the defaults' distribution exactly, drafts
verified in batched rows; at batch B each such job runs its own forwards).

Speed (batch 1): one job at a time, in process, after one warm-up run per (variant, modality)
that is not timed; generated tokens are counted after EOS removal (content tokens only);
tokens/s = those tokens / wall time; NFE = forward passes; tokens per forward = tokens / NFE.
Speed (batch B): B jobs submitted at once (t = 0, closed batch) to one Engine (max_batch = B),
text and code, after a warm-up batch; AR jobs batch their one-token steps like diffusion steps.

Quality, on the same samples: NLL per token under a judge that is NOT a contestant — an
interpolated trigram model of the corpus's train split (bench/ngram_judge.py; prompts come from
the test split) — unigram entropy; text: dictionary-word share, repeated 3-grams, degenerate
samples (models/quality.py, the model issue's gates); code: parse rate where a blank, comment-
or docstring-only completion is a failure (`quality.adds_code`); MIDI: valid rate, token-type
errors, pitch-class and duration overlap with held-out pieces.

Writes JSON and one Pareto plot per modality (tokens per forward vs judge NLL).

    python bench/sampler_vs_ar.py [--length 128] [--prompts 4] [--batch 8] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info
from ngram_judge import judges_from_corpus

from unmask.corpus.shards import load_split
from unmask.engine.engine import SUCCEEDED, Engine
from unmask.engine.request import GenerationRequest
from unmask.models import music_metrics as mm
from unmask.models import quality as q
from unmask.models.evaluate import parses, unigram_entropy
from unmask.models.generation import Generator, default_model_dir
from unmask.models.sampler_params import MODEL_DEFAULTABLE, SamplerParams

MODALITIES = ("text", "code", "midi")
AR = "AR (KV cache), defaults"
DEFAULTS = "diffusion, defaults"
SPECULATIVE = "self-speculative (defaults' distribution)"
BATCH_MODALITIES = ("text", "code")


def variants(n: int) -> dict[str, dict[str, Any] | None]:
    """name -> the knobs set on top of the model's defaults (None: the AR baseline)."""
    return {
        AR: None,
        DEFAULTS: {},
        "2 tokens/step": {"steps": -(-n // 2)},
        "4 tokens/step": {"steps": -(-n // 4)},
        "factor 0.5": {"threshold_factor": 0.5},
        "factor 1": {"threshold_factor": 1.0},
        "factor 2": {"threshold_factor": 2.0},
        "factor 4": {"threshold_factor": 4.0},
        "threshold 0.7": {"threshold": 0.7},
        SPECULATIVE: {"speculative": True},
    }


def params_for(knobs: dict[str, Any] | None, n: int, seed: int) -> SamplerParams:
    knobs = knobs or {}
    unset = tuple(k for k in MODEL_DEFAULTABLE if k not in knobs)
    return SamplerParams(gen_length=n, seed=seed, unset=unset, **knobs)


def sample_quality(modality: str, gen: Generator, judge: Any, prompt: list[int], new: list[int],
                   output: Any) -> dict[str, Any]:  # fmt: skip
    """Quality of one sample: `new` = generated content ids, EOS and specials removed."""
    out: dict[str, Any] = {
        "nll": judge.nll(prompt, new) if judge is not None else None,
        "entropy": unigram_entropy(new),
    }
    if modality in ("text", "code"):
        head = gen.vocab.decode(prompt, modality) if prompt else ""
        full = gen.vocab.decode(prompt + new, modality) if prompt + new else ""
        completion = full[len(head) :] if full.startswith(head) else full
        if modality == "text":
            out["dictionary_words"] = q.dictionary_word_share(completion)
            out["repeated_3grams"] = q.repeated_ngram_share(completion)
            out["degenerate"] = float(q.is_degenerate(completion))
        else:
            out["parse"] = float(parses(full) and q.adds_code(head, completion))
    if modality == "midi":
        out["type_error_rate"] = gen.vocab.count_midi_type_errors(new) / max(1, len(new))
        try:
            before = len(mm.read_notes(gen.vocab.decode(prompt, "midi"))) if prompt else 0
        except Exception:
            before = 0
        data = output if isinstance(output, bytes) else b""
        notes = mm.read_notes(data) if mm.has_notes(data) else []
        out["valid"] = float(len(notes) > before)
        out["notes"] = notes[before:]
    return out


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def run_b1(gens: dict[str, Generator], chosen: dict[str, dict[str, Any] | None], modality: str,
           plist: list[list[int]], n: int, judge: Any, ref_notes: list) -> dict[str, dict]:  # fmt: skip
    """Batch 1, all variants of one modality, interleaved: prompt by prompt, every variant in
    turn, so a busy spell of a shared machine slows all of them alike."""
    acc: dict[str, dict[str, list]] = {k: {"lat": [], "toks": [], "nfe": [], "qs": []}
                                       for k in chosen}  # fmt: skip
    for name, knobs in chosen.items():  # warm-up, untimed
        gens[name].run(gens[name].prepare_from_ids(modality, plist[0], params_for(knobs, n, 0)))
    for i, ids in enumerate(plist):
        for name, knobs in chosen.items():
            gen, a = gens[name], acc[name]
            job = gen.prepare_from_ids(modality, ids, params_for(knobs, n, i))
            t = time.perf_counter()
            try:
                out = gen.run(job)
            except Exception:  # e.g. MIDI with no playable notes: counted as invalid
                a["qs"].append({"valid": 0.0, "nll": None, "entropy": 0.0, "notes": []})
                continue
            a["lat"].append(time.perf_counter() - t)
            new = gen.vocab.strip_specials(out.generated_ids)  # up to the first EOS, content only
            a["toks"].append(len(new))
            a["nfe"].append(out.nfe)
            a["qs"].append(sample_quality(modality, gen, judge, ids, new, out.output))
    return {name: _summarise(modality, a, ref_notes) for name, a in acc.items()}


def _summarise(modality: str, a: dict[str, list], ref_notes: list) -> dict[str, Any]:
    lat, toks, nfe, qs = a["lat"], a["toks"], a["nfe"], a["qs"]
    row: dict[str, Any] = {
        "tokens_per_s_b1": sum(toks) / max(sum(lat), 1e-9),
        "latency_s": _mean(lat),
        "ms_per_forward": 1000 * sum(lat) / max(sum(nfe), 1),
        "nfe": _mean(nfe),
        "generated_tokens": _mean(toks),
        "tokens_per_forward": sum(toks) / max(sum(nfe), 1),
        "judge_nll": _mean([x["nll"] for x in qs]),
        "entropy_bits": _mean([x["entropy"] for x in qs]),
    }
    for key, name in (("dictionary_words", "dictionary_word_share"),
                      ("repeated_3grams", "repeated_3gram_share"),
                      ("degenerate", "degenerate_share"), ("parse", "parse_rate"),
                      ("valid", "valid_rate"), ("type_error_rate", "type_error_rate")):  # fmt: skip
        if any(key in x for x in qs):
            row[name] = _mean([x.get(key) for x in qs])
    notes = [x for s in qs for x in s.get("notes", [])]
    if modality == "midi" and notes and ref_notes:
        row["pitch_class_overlap"] = mm.overlap_area(
            mm.pitch_class_histogram(notes), mm.pitch_class_histogram(ref_notes))  # fmt: skip
        row["duration_overlap"] = mm.overlap_area(
            mm.duration_histogram(notes), mm.duration_histogram(ref_notes))  # fmt: skip
    return row


def run_batch(gen: Generator, knobs: dict[str, Any] | None, modality: str,
              plist: list[list[int]], n: int, batch: int) -> dict[str, Any]:  # fmt: skip
    """B jobs submitted together to one Engine: aggregate content tokens/s."""

    def requests(k: int) -> list[GenerationRequest]:
        return [GenerationRequest(modality, prompt=gen.vocab.decode(plist[i % len(plist)], modality),
                                  params=params_for(knobs, n, i)) for i in range(k)]  # fmt: skip

    with Engine(gen, max_batch=batch) as engine:
        [h.result(timeout=1800) for h in [engine.submit(r) for r in requests(2)]]  # warm-up
        f0, r0 = engine.forward_passes, engine.rows_run
        t = time.perf_counter()
        results = [h.result(timeout=1800) for h in [engine.submit(r) for r in requests(batch)]]
        wall = time.perf_counter() - t
        forwards, rows = engine.forward_passes - f0, engine.rows_run - r0
    ok = [r for r in results if r.status == SUCCEEDED]
    # content tokens: the generated count less the EOS that ended a job
    toks = sum(int(r.usage.get("generated_tokens", 0)) - (r.usage.get("finish_reason") == "eos")
               for r in ok)  # fmt: skip
    return {"tokens_per_s": toks / wall, "wall_s": wall, "ok": len(ok), "forwards": forwards,
            "mean_rows_per_forward": rows / max(forwards, 1)}  # fmt: skip


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not dominated in (more tokens per forward, lower NLL)."""
    front, best = [], float("inf")
    for x, y, name in sorted(points, key=lambda p: -p[0]):
        if y < best:
            front.append((x, y, name))
            best = y
    return front


def plot(rows: dict[str, dict], modality: str, path: Path, judge_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r[modality]["tokens_per_forward"], r[modality]["judge_nll"], name)
           for name, r in rows.items() if r[modality]["judge_nll"] is not None]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x, y, name in pts:
        ax.scatter(x, y, color="tab:red" if name.startswith("AR") else "tab:blue")
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto(pts)
    ax.plot([f[0] for f in front], [f[1] for f in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("tokens per forward (batch 1)")
    ax.set_ylabel(f"judge NLL per token ({judge_name}; lower is better)")
    ax.set_title(f"{modality}: tokens per forward vs quality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--ar-model", default=str(default_model_dir("model-ar")))
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (both models)")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variant names")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    diff = Generator.load(args.model, dtype=args.dtype)
    ar = Generator.load(args.ar_model, dtype=args.dtype)
    diff.truncate_prompts = ar.truncate_prompts = True
    test = load_split(args.corpus, "test")
    prompts = {m: [[int(i) for i in d[: args.prompt_tokens]]
                   for d in [d for d in test[m] if len(d) > args.prompt_tokens][: args.prompts]]
               for m in MODALITIES if m in test}  # fmt: skip
    t_judge = time.perf_counter()
    judges = judges_from_corpus(args.corpus, diff.model.config.vocab_size, list(prompts))
    t_judge = time.perf_counter() - t_judge
    ref = [n for d in list(test.get("midi", []))[:30]
           for n in mm.read_notes(diff.vocab.decode([int(i) for i in d], "midi"))]  # fmt: skip
    chosen = variants(args.length)
    if args.variants:
        keep = {v.strip() for v in args.variants.split(",")} | {AR, DEFAULTS}
        chosen = {k: v for k, v in chosen.items() if k in keep}
    rows: dict[str, dict] = {name: {} for name in chosen}
    gens = {name: ar if knobs is None else diff for name, knobs in chosen.items()}
    t0 = time.perf_counter()
    for m, plist in prompts.items():
        for name, r in run_b1(gens, chosen, m, plist, args.length, judges.get(m), ref).items():
            rows[name][m] = r
    for name, knobs in chosen.items():
        for m, plist in prompts.items():
            if m in BATCH_MODALITIES and args.batch > 1:
                r = rows[name][m]
                r["batch"] = run_batch(gens[name], knobs, m, plist, args.length, args.batch)
                r[f"tokens_per_s_b{args.batch}"] = r["batch"]["tokens_per_s"]
        log(f"{name:24s} " + "  ".join(
            f"{m}: {r['tokens_per_s_b1']:.0f} tok/s b1 ({r['tokens_per_forward']:.2f} tok/fwd), "
            f"nll {r['judge_nll'] if r['judge_nll'] is None else round(r['judge_nll'], 2)}"
            for m, r in rows[name].items()))  # fmt: skip
    for m in prompts:
        plot(rows, m, out / f"pareto_{m}.png", "held-out trigram")
    ar_rows = rows[AR]
    speedup = {name: {m: r[m]["tokens_per_s_b1"] / max(ar_rows[m]["tokens_per_s_b1"], 1e-9)
                      for m in prompts} for name, r in rows.items()}  # fmt: skip
    speedup_b = {name: {m: r[m][f"tokens_per_s_b{args.batch}"]
                        / max(ar_rows[m][f"tokens_per_s_b{args.batch}"], 1e-9)
                        for m in prompts if f"tokens_per_s_b{args.batch}" in r[m]}
                 for name, r in rows.items()}  # fmt: skip
    report = {
        "machine": machine_info(args.threads),
        "dtype": {"diffusion": diff.model.inference_dtype, "ar": ar.model.inference_dtype},
        "models": {"diffusion": args.model, "ar": args.ar_model},
        "judge": {"kind": "interpolated trigram (bench/ngram_judge.py) of the corpus train split, "
                          "one per modality; not a contestant", "build_s": round(t_judge, 1),
                  "train_tokens": {m: j.tokens for m, j in judges.items()}},  # fmt: skip
        "length": args.length, "prompts_per_modality": args.prompts,
        "prompt_tokens": args.prompt_tokens, "batch": args.batch,
        "arrival": {"b1": "closed loop: one job at a time, in process, one untimed warm-up run "
                          "per variant; variants interleaved prompt by prompt",
                    f"b{args.batch}": f"{args.batch} jobs submitted at t=0 to one Engine "
                                      f"(max_batch {args.batch}), after an untimed warm-up batch; "
                                      "text and code"},  # fmt: skip
        "token_count": "generated content tokens after EOS removal (specials dropped)",
        "variants": rows,
        "knobs": {k: v for k, v in chosen.items()},
        "speedup_vs_ar_b1": speedup,
        f"speedup_vs_ar_b{args.batch}": speedup_b,
        "wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    (out / "sampler_vs_ar.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"wrote {out / 'sampler_vs_ar.json'} in {report['wall_s']}s")
    return report


if __name__ == "__main__":
    main()
