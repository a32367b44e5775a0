"""Diffusion sampler variants vs the AR baseline: speed and a quality proxy, same run.

For a few held-out text and code prompts, each variant writes `--length` tokens at batch 1.
Reported per variant: generated tokens/s, latency, NFE, tokens per forward, unigram entropy, and
the NLL per token of the continuation under a judge model (default: the shipped AR baseline; it
scores its own samples, which flatters the AR row — read the diffusion rows against each other).

    python bench/sampler_speed.py [--length 256] [--prompts 3] [--json bench/results/sampler_speed.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections import Counter
from pathlib import Path

import torch

from unmask.corpus.shards import load_split
from unmask.models.generation import Generator, default_model_dir
from unmask.models.sampler_params import SamplerParams


def variants(n: int) -> dict[str, SamplerParams | None]:
    P = SamplerParams
    return {
        "ar (kv cache)": None,
        "diffusion full canvas, L/4 steps, no cache": P(gen_length=n, steps=n // 4),
        "block32, L/4 steps, no cache": P(gen_length=n, steps=n // 4, block_length=32),
        "block32, L/4 steps, prefix cache": P(gen_length=n, steps=n // 4, block_length=32,
                                              use_cache="prefix"),
        "block32, L/8 steps, prefix cache": P(gen_length=n, steps=n // 8, block_length=32,
                                              use_cache="prefix"),
        "block32, L/4 steps, dual cache": P(gen_length=n, steps=n // 4, block_length=32,
                                            use_cache="dual"),
        "block32, threshold 0.9, prefix cache": P(gen_length=n, steps=n, block_length=32,
                                                  threshold=0.9, use_cache="prefix"),
    }  # fmt: skip


def judge_nll(judge: Generator, head: list[int], new: list[int]) -> float:
    """NLL per token of `new` after `head` under a causal judge model."""
    if not new:
        return float("nan")
    ids = torch.tensor([head + new])[:, : judge.max_len]
    logits, _ = judge.model(ids)
    logp = logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    return float(nll[len(head) - 1 :].mean())


def entropy(ids: list[int]) -> float:
    c, n = Counter(ids), len(ids)
    return -sum(v / n * math.log2(v / n) for v in c.values()) if n else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--ar-model", default=str(default_model_dir("model-ar")))
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="bench/results/sampler_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    diff, ar = Generator.load(args.model), Generator.load(args.ar_model)
    n = args.length
    prompts = []
    test = load_split(args.corpus, "test")
    for modality in ("text", "code"):
        docs = [d for d in test[modality] if len(d) > args.prompt_tokens][: args.prompts]
        prompts += [(modality, [int(i) for i in d[: args.prompt_tokens]]) for d in docs]

    rows = {}
    for name, params in variants(n).items():
        stats = {"latency_s": [], "tokens": [], "nfe": [], "nll": [], "entropy": []}
        for modality, ids in prompts:
            head = diff.header(modality) + ids
            gen = diff if params is not None else ar
            p = params or SamplerParams(gen_length=n, steps=n)
            job = gen.prepare_generate(modality, diff.vocab.decode(ids, modality), p)
            job.canvas = job.canvas and type(job.canvas)(
                [type(job.canvas.segments[0])(head), job.canvas.segments[1]]
            )  # exact prompt ids
            if job.ar_prompt is not None:
                job.ar_prompt = head
            gen.run(job) if not stats["tokens"] else None  # warm-up on the first prompt
            t = time.perf_counter()
            out = gen.run(job)
            stats["latency_s"].append(time.perf_counter() - t)
            new = [i for i in out.generated_ids if i >= 16]
            stats["tokens"].append(len(out.generated_ids))
            stats["nfe"].append(out.nfe)
            stats["nll"].append(judge_nll(ar, head, new))
            stats["entropy"].append(entropy(new))
        lat, toks = sum(stats["latency_s"]), sum(stats["tokens"])
        rows[name] = {
            "tokens_per_s": toks / lat,
            "latency_s": lat / len(prompts),
            "nfe": sum(stats["nfe"]) / len(prompts),
            "tokens_per_forward": toks / sum(stats["nfe"]),
            "judge_nll": sum(x for x in stats["nll"] if x == x)
            / max(1, sum(x == x for x in stats["nll"])),
            "unigram_entropy_bits": sum(stats["entropy"]) / len(prompts),
        }
    base = rows["ar (kv cache)"]["tokens_per_s"]
    print(
        f"{'variant':44s} {'tok/s':>8s} {'x AR':>6s} {'lat s':>7s} {'NFE':>6s} {'tok/fwd':>7s} {'judge NLL':>9s} {'H bits':>6s}"
    )
    for name, r in rows.items():
        print(
            f"{name:44s} {r['tokens_per_s']:8.1f} {r['tokens_per_s'] / base:6.2f} {r['latency_s']:7.2f} "
            f"{r['nfe']:6.1f} {r['tokens_per_forward']:7.2f} {r['judge_nll']:9.3f} {r['unigram_entropy_bits']:6.2f}"
        )
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": args.threads, "torch": torch.__version__},
        "length": n, "prompts": len(prompts), "variants": rows,
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
