"""Engine throughput: step-level batching vs one job at a time, same run, same requests.

N text jobs (default 32, gen_length 64, 32 steps) are submitted at once
  1. to an in-process Engine with batching (max_batch = --max-batch),
  2. to an in-process Engine with batching off (one job per forward pass),
  3. (unless --no-worker) through Redis to one `unmask worker` with --concurrency 16, and with
     --concurrency 1 as its baseline (a private redis-server on a free port).
Reported: wall time, jobs/s, generated tokens/s, forward passes. Default model: a random tiny
Denoiser with the shipped vocabulary (d_model 32, 1 layer), or --model DIR.

    python bench/engine_throughput.py [--jobs 32] [--no-worker] [--json bench/results/engine_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from unmask.engine.engine import SUCCEEDED, Engine
from unmask.engine.request import GenerationRequest
from unmask.models.generation import Generator
from unmask.models.sampler_params import SamplerParams

PROMPTS = ["Once upon a time", "The river", "In the morning", "She said", "It was", "Dear sir"]


def tiny_model(directory: Path, d_model: int, n_layers: int) -> Path:
    from unmask.models import checkpoint
    from unmask.models.network import Denoiser, ModelConfig
    from unmask.tokenizers.vocab import UnifiedVocab

    vocab = UnifiedVocab.load()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab.size, d_model=d_model, n_layers=n_layers, n_heads=2,
                      max_seq_len=256, mask_id=vocab.mask_id)  # fmt: skip
    return checkpoint.save(directory, Denoiser(cfg), vocab)


def requests(n: int, length: int, steps: int, model: str = "default") -> list[GenerationRequest]:
    params = SamplerParams(gen_length=length, steps=steps, stop_at_eos=False)
    return [
        GenerationRequest("text", prompt=PROMPTS[i % len(PROMPTS)], params=params, model=model)
        for i in range(n)
    ]


def summarise(name: str, wall: float, results: list, extra: dict | None = None) -> dict:
    ok = [r for r in results if r.status == SUCCEEDED]
    tokens = sum(r.usage.get("generated_tokens", 0) for r in ok)
    row = {
        "mode": name,
        "jobs": len(results),
        "succeeded": len(ok),
        "wall_s": round(wall, 3),
        "jobs_per_s": round(len(ok) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "generated_tokens": tokens,
        **(extra or {}),
    }
    print(
        f"{name:<34} {row['succeeded']:>3}/{row['jobs']} ok  {row['wall_s']:>7.2f} s  "
        f"{row['jobs_per_s']:>7.2f} jobs/s  {row['tokens_per_s']:>8.1f} tok/s"
        + (f"  forwards {extra['forward_passes']}" if extra and "forward_passes" in extra else "")
    )
    return row


def run_engine(gen: Generator, reqs: list[GenerationRequest], batching: bool, max_batch: int):
    with Engine(gen, max_batch=max_batch, batching=batching, max_queue=len(reqs) + 1) as engine:
        t0 = time.perf_counter()
        handles = [engine.submit(r) for r in reqs]
        results = [h.result(timeout=3600) for h in handles]
        wall = time.perf_counter() - t0
        extra = {"forward_passes": engine.forward_passes, "rows_run": engine.rows_run}
    name = f"engine batched (max_batch {max_batch})" if batching else "engine one job at a time"
    return summarise(name, wall, results, extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(model_dir: Path, args: argparse.Namespace, concurrency: int) -> dict:
    from unmask.settings import Settings
    from unmask.workers.client import JobQueue

    tmp = Path(tempfile.mkdtemp(prefix="unmask-bench-"))
    port = free_port()
    redis_proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "UNMASK_BROKER_URL": url, "UNMASK_MODEL": str(model_dir),
           "UNMASK_MODEL_NAME": "bench", "UNMASK_DEVICE": "cpu",
           "UNMASK_MAX_BATCH": str(args.max_batch), "UNMASK_HEARTBEAT_S": "0.5",
           "OMP_NUM_THREADS": str(args.threads)}  # fmt: skip
    worker = None
    try:
        time.sleep(0.3)
        settings = Settings(broker_url=url, model_name="bench", max_queue=10_000)
        with JobQueue(settings) as q:
            deadline = time.monotonic() + 10
            while True:
                try:
                    q._redis.ping()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            worker = subprocess.Popen(
                [sys.executable, "-m", "unmask", "worker", "--concurrency", str(concurrency),
                 "--loglevel", "WARNING"],
                env=env, stdout=(tmp / "worker.log").open("wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            while not any(w["pid"] == worker.pid for w in q.live_workers("bench")):
                if worker.poll() is not None:
                    raise RuntimeError((tmp / "worker.log").read_text())
                time.sleep(0.1)
            reqs = requests(args.jobs, args.length, args.steps, model="bench")
            t0 = time.perf_counter()
            ids = [q.submit(r) for r in reqs]
            results = [q.result(j, timeout=3600) for j in ids]
            wall = time.perf_counter() - t0
        return summarise(f"worker via Redis, concurrency {concurrency}", wall, results)
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
        redis_proc.kill()
        redis_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: random tiny model)")
    ap.add_argument("--d-model", type=int, default=32, help="tiny model width")
    ap.add_argument("--layers", type=int, default=1, help="tiny model depth")
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-worker", action="store_true", help="skip the Redis + worker rows")
    ap.add_argument("--json", default="bench/results/engine_throughput.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="unmask-tiny-"))
    model_dir = Path(args.model) if args.model else tiny_model(tmp, args.d_model, args.layers)
    gen = Generator.load(model_dir, device="cpu")
    reqs = requests(args.jobs, args.length, args.steps)
    print(f"{args.jobs} text jobs, gen_length {args.length}, steps {args.steps}, "
          f"{args.threads} torch thread(s), model {args.model or 'tiny random'}")  # fmt: skip
    rows = [
        run_engine(gen, reqs, batching=True, max_batch=args.max_batch),
        run_engine(gen, reqs, batching=False, max_batch=args.max_batch),
    ]
    if not args.no_worker:
        if shutil.which("redis-server") is None:
            print("redis-server not found: skipping the worker rows")
        else:
            rows.append(run_worker(model_dir, args, concurrency=16))
            rows.append(run_worker(model_dir, args, concurrency=1))
    speedup = rows[0]["tokens_per_s"] / max(rows[1]["tokens_per_s"], 1e-9)
    print(f"engine batching speed-up: {speedup:.2f}x tokens/s")
    out = {
        "config": {
            "jobs": args.jobs,
            "gen_length": args.length,
            "steps": args.steps,
            "max_batch": args.max_batch,
            "torch_threads": args.threads,
            "model": args.model or f"tiny random (d_model {args.d_model}, {args.layers} layer)",
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
        "rows": rows,
        "engine_batching_speedup_tokens_per_s": round(speedup, 3),
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
