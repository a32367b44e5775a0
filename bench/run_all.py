"""`make bench`: every benchmark in one run, then docs/benchmarks.md and docs/benchmarks.json.

python bench/run_all.py [--quick] [--threads 1]

Every table says what it ran on (CPU model, AMX / AVX512-BF16 or not, threads, torch version,
dtype), how requests arrived and how tokens were counted; the JSON next to the markdown holds
every number. Ratios are taken inside one run: on a shared machine compare rows, not runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import forward_flops
import sampler_vs_ar
import service_load
from machine import describe, machine_info

DOCS = Path("docs")
RESULTS = Path("bench/results")


def fmt(v, spec=".2f") -> str:
    return "–" if v is None else format(v, spec)


def sampler_tables(r: dict) -> str:
    b = r["batch"]
    out = []
    for m in ("text", "code", "midi"):
        if m not in next(iter(r["variants"].values())):
            continue
        extra = {"text": ["dictionary_word_share", "repeated_3gram_share", "degenerate_share"],
                 "code": ["parse_rate"],
                 "midi": ["valid_rate", "type_error_rate", "pitch_class_overlap",
                          "duration_overlap"]}[m]  # fmt: skip
        batched = m in sampler_vs_ar.BATCH_MODALITIES and b > 1
        head = ["variant", "tok/s b1", "× AR b1", "tok/fwd", "ms/fwd", "NFE", "tokens"]
        head += [f"tok/s b{b}", f"× AR b{b}"] if batched else []
        head += ["judge NLL", "entropy"] + extra
        out.append(f"\n#### {m}\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for name, rows in r["variants"].items():
            x = rows[m]
            cells = [name, fmt(x["tokens_per_s_b1"], ".0f"), fmt(r["speedup_vs_ar_b1"][name][m]),
                     fmt(x["tokens_per_forward"]), fmt(x["ms_per_forward"], ".1f"),
                     fmt(x["nfe"], ".0f"), fmt(x["generated_tokens"], ".0f")]  # fmt: skip
            if batched:
                cells += [fmt(x.get(f"tokens_per_s_b{b}"), ".0f"),
                          fmt(r[f"speedup_vs_ar_b{b}"][name].get(m))]  # fmt: skip
            cells += [fmt(x["judge_nll"]), fmt(x["entropy_bits"])]
            cells += [fmt(x.get(k)) for k in extra]
            out.append("| " + " | ".join(cells) + " |")
        out.append(f"\n![{m}](pareto_{m}.png)")
    return "\n".join(out)


def flops_tables(f: dict) -> str:
    peak = f["gemm_peak_gflops"]
    out = [f"Measured GEMM peak (1024³ matmul, {f['machine']['threads']} thread(s)): "
           f"fp32 {peak['float32']:.0f} GFLOP/s, bf16 {peak['bfloat16']:.0f} GFLOP/s.\n",
           "| model, dtype | batch | tokens in | ms | GFLOP | GFLOP/s | % of peak | GEMM | "
           "attention | other kernels | Python + dispatch |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, rows in f["forward"].items():
        pk = peak["bfloat16" if "bfloat16" in key else "float32"]
        for x in rows:
            s = x["share"]
            out.append(f"| {key} | {x['batch']} | {x['batch'] * x['window']} (+{x['past']} cached) | "
                       f"{x['ms']:.2f} | {x['gflop']:.3f} | {x['gflops']:.1f} | "
                       f"{100 * x['gflops'] / pk:.0f}% | {100 * s['gemm']:.0f}% | "
                       f"{100 * s['attention']:.0f}% | {100 * s['other_kernels']:.0f}% | "
                       f"{100 * s['python_and_dispatch']:.0f}% |")  # fmt: skip
    out += ["", "Per step of a whole generation (batch 1, model defaults, text, 128 tokens): "
            "the forward vs the sampler's work after it.", "",
            "| model, dtype | ms/step | forward ms | after-forward ms | forward share |",
            "|---|---|---|---|---|"]  # fmt: skip
    for key, x in f["per_step"].items():
        out.append(f"| {key} | {x['ms_per_step']:.2f} | {x['forward_ms_per_step']:.2f} | "
                   f"{x['after_forward_ms_per_step']:.2f} | {100 * x['forward_share']:.0f}% |")  # fmt: skip
    return "\n".join(out)


def load_tables(r: dict) -> str:
    out = []
    if "celery_waves" in r:
        w = r["celery_waves"]
        out += ["| wave (all sent at t=0) | requests | wall s | tokens | tok/s | p50 ms |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for k in ("c1", "c8", "c32"):
            x = w[k]
            out.append(f"| {k} | {x['requests']} | {x['wall_s']:.2f} | {x['tokens']} | "
                       f"{x['tokens_per_s']:.0f} | {x['p50_ms']:.0f} |")  # fmt: skip
        out += ["", f"- 8 concurrent: wall = **{w['wall_c8_over_c1']:.2f}×** one request "
                "(target ≤ 3×, goal 2×)",
                f"- 32 concurrent: aggregate tokens/s = **{w['tokens_per_s_c32_over_c1']:.2f}×** "
                "concurrency 1 (target ≥ 4×)", ""]  # fmt: skip
    if r.get("modes"):
        out += [
            "Fixed-load grid (`bench/service_load.py`): 32 requests per level at gen_length 32, "
            "8 steps, the client's concurrency capped at the level:",
            "",
            "| mode | concurrency | ok | errors | req/s | tok/s | p50 ms | p95 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, rows in r["modes"].items():
            for x in rows:
                out.append(f"| {mode} | {x['concurrency']} | {x['ok']} | {x['errors']} | "
                           f"{x['requests_per_s']:.2f} | {x['tokens_per_s']:.0f} | "
                           f"{x['p50_ms']:.0f} | {x['p95_ms']:.0f} | {x['p99_ms']:.0f} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer prompts and requests")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--from-results", action="store_true",
                    help="only re-render the docs from bench/results/*.json")  # fmt: skip
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.from_results:
        sampler, flops, load = (json.loads((RESULTS / f"{name}.json").read_text())
                                for name in ("sampler_vs_ar", "forward_flops", "service_load"))  # fmt: skip
    else:
        if not Path("data/corpus/manifest.json").exists():
            subprocess.run([sys.executable, "-m", "unmask", "data", "build", "--quiet"], check=True)
        th = ["--threads", str(args.threads)]
        n = ["--prompts", "2", "--length", "64", "--batch", "8"] if args.quick else []
        sampler = sampler_vs_ar.main(n + th)
        flops = forward_flops.main(th + (["--length", "64"] if args.quick else []))
        load = service_load.main(th + ["--requests", "32"])
    mc = sampler.get("machine") or machine_info(args.threads)
    report = {"machine": mc, "sampler_vs_ar": sampler, "forward_flops": flops,
              "service_load": load, "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    DOCS.mkdir(exist_ok=True)
    (DOCS / "benchmarks.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = render(report)
    (DOCS / "benchmarks.md").write_text(md)
    for png in RESULTS.glob("pareto_*.png"):
        shutil.copy(png, DOCS / png.name)
    print(f"wrote docs/benchmarks.md and docs/benchmarks.json in {report['wall_s']:.0f}s")


def render(report: dict) -> str:
    sampler, flops, load = report["sampler_vs_ar"], report["forward_flops"], report["service_load"]
    b = sampler["batch"]
    defaults = sampler["speedup_vs_ar_b1"][sampler_vs_ar.DEFAULTS]
    best = {m: max(((k, v[m]) for k, v in sampler["speedup_vs_ar_b1"].items()
                    if k != sampler_vs_ar.AR), key=lambda kv: kv[1])
            for m in defaults}  # fmt: skip
    conditions = (f"Machine: {describe(sampler['machine'])}. Weights: diffusion "
                  f"{sampler['dtype']['diffusion']}, AR {sampler['dtype']['ar']} "
                  f"(`Generator.load(dtype=\"auto\")`).")  # fmt: skip
    return f"""# Benchmarks

Generated by `make bench` (`python bench/run_all.py --threads {report["machine"]["threads"]}`;
the parts: `bench/sampler_vs_ar.py`, `bench/forward_flops.py`, `bench/service_load.py`, each with
`--threads {report["machine"]["threads"]}`, then `bench/run_all.py --from-results`). Raw numbers: `docs/benchmarks.json`. All ratios come from one run
on a shared machine (other processes were running; the load average at the start of each part
is in the JSON): compare rows with each other, not with other machines or runs. What was
changed for speed, where the time goes and which targets are met: `docs/speed.md`.

## The shipped diffusion model vs the AR baseline

{conditions}

Length {sampler["length"]} tokens, {sampler["prompts_per_modality"]} held-out prompts of
{sampler["prompt_tokens"]} tokens per modality (test split). Arrival: batch 1 = {sampler["arrival"]["b1"]};
batch {b} = {sampler["arrival"][f"b{b}"]}. Tokens: {sampler["token_count"]}.
Judge: {sampler["judge"]["kind"]} — neither contestant scores anything.
Both models run at their own `sampler_defaults` (same temperature and top_p per modality); the
diffusion rows change only how many tokens one forward may commit (block 4: at most 4).
The self-speculative row draws from exactly the defaults' distribution (models/speculative.py):
its quality columns differ from the defaults' row by sampling noise only; its batch-{b} jobs
draft nothing while other jobs share the forward (`docs/speed.md` §2b).

At the model's defaults, diffusion ÷ AR tokens/s at batch 1: {", ".join(f"{m} {v:.2f}×" for m, v in defaults.items())}.
Best variant: {", ".join(f"{m} {v:.2f}× ({k})" for m, (k, v) in best.items())} — read its judge NLL
and the gate columns before calling it matched quality.
{sampler_tables(sampler)}

## Achieved GFLOP/s of the forward

{describe(flops["machine"])}.

{flops_tables(flops)}

## The service under load

{describe(load["machine"])}. gRPC → Redis → one Celery worker (threads pool, one Engine,
UNMASK_MAX_BATCH=32); the Python async client sends only a seed, so every knob is the model's
default (gen_length 128, 1 token per step). Waves: every request of a wave is sent at t = 0.
Tokens: generated content tokens (the EOS that ended a request not counted).

{load_tables(load)}
{waves_section()}"""


def waves_section() -> str:
    """The in-process counterpart of the service waves (bench/engine_waves.py), when it ran."""
    path = RESULTS / "engine_waves_cpu.json"
    if not path.exists():
        return ""
    w = json.loads(path.read_text())
    out = ["", "## In-process Engine waves (`bench/engine_waves.py`)", "",
           f"{describe(w['machine'])}. {w['arrival']}; model defaults, gen_length 128.", "",
           "| model, dtype | jobs | wall s | tokens | tok/s | × c1 tok/s | wall ÷ c1 | forwards |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, rows in w["models"].items():
        for x in rows:
            out.append(f"| {key} | {x['jobs']} | {x['wall_s']:.2f} | {x['tokens']} | "
                       f"{x['tokens_per_s']:.0f} | {x['tokens_per_s_over_c1']:.2f} | "
                       f"{x['wall_over_c1']:.2f} | {x['forwards']} |")  # fmt: skip
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
