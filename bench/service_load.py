"""The service under load: in-process Engine vs gRPC (local dispatcher) vs gRPC → Redis → Celery
worker, at concurrency 1, 8 and 32, with a bounded asyncio load client (fixed request count and
a time limit; loopback only). Also Engine step batching on vs off at concurrency 32 (gRPC-local,
UNMASK_MAX_BATCH=1 vs the default).

    python bench/service_load.py [--model DIR] [--requests 64] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROMPTS = ["Once upon a time", "def main():\n", "The river", "import os\n", "She said", "class A:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))] * 1000 if s else float("nan")

    return {"p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99)}


def knobs(args: argparse.Namespace, i: int) -> dict[str, Any]:
    return dict(gen_length=args.length, steps=args.steps, block_length=args.length,
                cache="prefix", seed=i)  # fmt: skip


async def grpc_load(target: str, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    from unmask.client import AsyncClient

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    errors: list[str] = []
    tokens = 0
    async with AsyncClient(target, timeout=args.time_limit) as client:

        async def one(i: int) -> None:
            nonlocal tokens
            async with sem:
                t = time.perf_counter()
                modality = "code" if "\n" in PROMPTS[i % len(PROMPTS)] else "text"
                try:
                    gen = await client.generate(PROMPTS[i % len(PROMPTS)], modality=modality,
                                                **knobs(args, i))  # fmt: skip
                    tokens += int(gen.usage.get("generated_tokens", 0))
                    lat.append(time.perf_counter() - t)
                except Exception as exc:  # counted, not raised: the report shows errors
                    errors.append(type(exc).__name__ + ": " + str(exc)[:120])

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(args.requests))),
                               args.time_limit)  # fmt: skip
        wall = time.perf_counter() - t0
    return _summary(lat, errors, tokens, wall, concurrency)


async def grpc_wave(target: str, n: int, timeout: float, stream: bool = False) -> dict[str, Any]:
    """`n` requests at the model's defaults, all sent at t = 0 (a closed wave): wall time until
    the last one is back, and content tokens (less the EOS that ended a request). `stream`:
    GenerateStream calls, every step event relayed to the client; else unary Generate calls
    (only the final result travels)."""
    from unmask.client import AsyncClient

    async with AsyncClient(target, timeout=timeout) as client:

        async def one(i: int) -> tuple[float, int]:
            prompt = PROMPTS[i % len(PROMPTS)]
            modality = "code" if "\n" in prompt else "text"
            t = time.perf_counter()
            if stream:
                async for event in client.stream(prompt, modality=modality, seed=i):
                    gen = event.get("generation", None)
            else:
                gen = await client.generate(prompt, modality=modality, seed=i)
            toks = int(gen.usage.get("generated_tokens", 0))
            toks -= gen.usage.get("finish_reason") == "eos"
            return time.perf_counter() - t, toks

        t0 = time.perf_counter()
        done = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout)
        wall = time.perf_counter() - t0
    lat = [x for x, _ in done]
    tokens = sum(k for _, k in done)
    return {"requests": n, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            **percentiles(lat)}  # fmt: skip


def waves(target: str, args: argparse.Namespace, log=print, stream: bool = False) -> dict[str, Any]:
    """Concurrency 1 (median of 3 single requests), then waves of 8 and 32 at once."""
    asyncio.run(grpc_wave(target, 2, args.time_limit, stream))  # warm-up (model load, first steps)
    singles = sorted((asyncio.run(grpc_wave(target, 1, args.time_limit, stream))
                      for _ in range(3)), key=lambda r: r["wall_s"])  # fmt: skip
    out: dict[str, Any] = {"c1": singles[1]}
    for n in (8, 32):
        out[f"c{n}"] = asyncio.run(grpc_wave(target, n, args.time_limit, stream))
        log(f"wave c{n}{' (streamed)' if stream else ''}: {out[f'c{n}']}")
    one = out["c1"]
    out["wall_c8_over_c1"] = out["c8"]["wall_s"] / one["wall_s"]
    out["tokens_per_s_c32_over_c1"] = out["c32"]["tokens_per_s"] / one["tokens_per_s"]
    return out


def inprocess_load(gen: Any, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    from unmask.engine.engine import SUCCEEDED, Engine
    from unmask.engine.request import GenerationRequest
    from unmask.models.sampler_params import SamplerParams

    lat: list[float] = []
    errors: list[str] = []
    tokens = 0
    lock = threading.Lock()
    sem = threading.Semaphore(concurrency)
    with Engine(gen, max_batch=max(concurrency, 1)) as engine:

        def one(i: int) -> None:
            nonlocal tokens
            with sem:
                k = knobs(args, i)
                params = SamplerParams(
                    gen_length=k["gen_length"],
                    steps=k["steps"],
                    block_length=k["block_length"],
                    use_cache="prefix",
                    seed=i,
                )
                prompt = PROMPTS[i % len(PROMPTS)]
                req = GenerationRequest("code" if "\n" in prompt else "text", prompt=prompt,
                                        params=params)  # fmt: skip
                t = time.perf_counter()
                res = engine.submit(req).result(timeout=args.time_limit)
                with lock:
                    if res.status == SUCCEEDED:
                        lat.append(time.perf_counter() - t)
                        tokens += int(res.usage.get("generated_tokens", 0))
                    else:
                        errors.append(str(res.error))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.requests)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
    return _summary(lat, errors, tokens, wall, concurrency)


def _summary(lat, errors, tokens, wall, concurrency) -> dict[str, Any]:
    return {"concurrency": concurrency, "ok": len(lat), "errors": len(errors),
            "error_examples": errors[:3], "wall_s": round(wall, 3),
            "requests_per_s": len(lat) / wall, "tokens_per_s": tokens / wall,
            **percentiles(lat)}  # fmt: skip


@contextmanager
def server(args: argparse.Namespace, env_extra: dict[str, str]):
    port = free_port()
    env = {**os.environ, "UNMASK_MODEL": args.model or "", "OMP_NUM_THREADS": str(args.threads),
           **env_extra}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "unmask", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        from unmask.client import Client

        with Client(f"127.0.0.1:{port}") as c:
            c.wait_ready(timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def redis_and_worker(args: argparse.Namespace, env_extra: dict[str, str] | None = None):
    tmp = Path(tempfile.mkdtemp(prefix="unmask-load-"))
    port = free_port()
    redis_proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "UNMASK_BROKER_URL": url, "UNMASK_MODEL": args.model or "",
           "UNMASK_DEVICE": "cpu", "OMP_NUM_THREADS": str(args.threads),
           **(env_extra or {})}  # fmt: skip
    time.sleep(0.3)
    worker = subprocess.Popen([sys.executable, "-m", "unmask", "worker", "--concurrency", "32",
                               "--loglevel", "WARNING"], env=env,
                              stdout=(tmp / "worker.log").open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield url
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        redis_proc.kill()
        redis_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None, log=print) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="", help="model dir (default: the shipped model)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--time-limit", type=float, default=600.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-celery", action="store_true")
    ap.add_argument("--waves-only", action="store_true",
                    help="only the gRPC -> Redis -> worker waves at the model's defaults")  # fmt: skip
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    import torch

    from unmask.models.generation import Generator

    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"config": vars(args), "modes": {}}
    if not args.no_celery:
        # one worker, one Engine batching up to 32 jobs; the client sends only a seed, so every
        # other knob is the model's default (gen_length 128, tokens_per_step ...)
        extra = {"UNMASK_MAX_BATCH": "32"}
        with redis_and_worker(args, extra) as url, server(args, {"UNMASK_BROKER_URL": url}) as tgt:
            report["celery_waves"] = waves(tgt, args, log)
            # the same waves as GenerateStream calls: what relaying every step event costs
            report["celery_waves_streamed"] = waves(tgt, args, log, stream=True)
        for key in ("celery_waves", "celery_waves_streamed"):
            w = report[key]
            log(f"gRPC -> Redis -> worker ({key}): c8 wall / c1 wall = "
                f"{w['wall_c8_over_c1']:.2f}, c32 tok/s / c1 tok/s = "
                f"{w['tokens_per_s_c32_over_c1']:.2f}")  # fmt: skip
    if args.waves_only:
        _write(report, args, log)
        return report
    gen = Generator.load(args.model or None)
    report["modes"]["in-process"] = [inprocess_load(gen, args, c) for c in levels]
    log(f"in-process: {report['modes']['in-process']}")
    del gen
    with server(args, {}) as target:
        report["modes"]["grpc-local"] = [asyncio.run(grpc_load(target, args, c)) for c in levels]
    log(f"grpc-local: {report['modes']['grpc-local']}")
    with server(args, {"UNMASK_MAX_BATCH": "1"}) as target:
        report["batching_off_c32"] = asyncio.run(grpc_load(target, args, max(levels)))
    on = report["modes"]["grpc-local"][-1]["tokens_per_s"]
    report["batching_speedup_c32"] = on / max(report["batching_off_c32"]["tokens_per_s"], 1e-9)
    log(f"batching on/off at c{max(levels)}: {report['batching_speedup_c32']:.2f}x")
    if not args.no_celery:
        with redis_and_worker(args) as url, server(args, {"UNMASK_BROKER_URL": url}) as target:
            report["modes"]["grpc-celery"] = [asyncio.run(grpc_load(target, args, c))
                                              for c in levels]  # fmt: skip
        log(f"grpc-celery: {report['modes']['grpc-celery']}")
        base = report["modes"]["in-process"][0]["p50_ms"]
        report["celery_added_p50_ms_c1"] = report["modes"]["grpc-celery"][0]["p50_ms"] - base
    report["grpc_local_added_p50_ms_c1"] = (
        report["modes"]["grpc-local"][0]["p50_ms"] - report["modes"]["in-process"][0]["p50_ms"]
    )
    _write(report, args, log)
    return report


def _write(report: dict[str, Any], args: argparse.Namespace, log) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import machine_info

    report["machine"] = machine_info(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "service_load.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out / 'service_load.json'}")


if __name__ == "__main__":
    main()
