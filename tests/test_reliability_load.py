"""Load: many requests at concurrency 32 through gRPC → Redis → worker, with zero errors.

The whole path is real and in separate processes: `unmask serve --broker` (the torch-free front
end), a redis-server with the append-only file on (fsync every second, as in production), and
one `unmask worker` (threads pool, 32 task threads feeding one batched Engine, tiny model).
An asyncio client keeps 32 calls in flight (Generate, GenerateStream and infill mixed) and
records each call's latency; a sampler records the front end's and the worker's RSS.

Reports (printed; docs/reliability.md keeps the latest): requests, errors, throughput, latency
p50/p95/p99/max, peak RSS of the server and the worker (sampled during the run, and VmHWM
since start), Redis peak memory. Then a ledger check: every job ran to exactly one result.

Default run: LOAD_REQUESTS (500; UNMASK_LOAD_REQUESTS overrides), ~30 s on 2 busy cores.
`-m slow`: SLOW_REQUESTS (2000).
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time

import pytest
import redis
from redis_fixtures import PersistentRedis, WorkerProcess, wait_until
from test_reliability_input import ServeProcess, proc_memory

from unmask.client import AsyncClient, Client, ServiceError
from unmask.workers import protocol

MODEL = "tiny"
CONCURRENCY = 32
LOAD_REQUESTS = int(os.environ.get("UNMASK_LOAD_REQUESTS", "500"))
SLOW_REQUESTS = 2000
LATENCY_P99_LIMIT_S = 30.0  # a sanity bound on a busy 2-core machine, not a target


@pytest.fixture(autouse=True)
def _slow_only_with_m_slow(request):
    """`slow` tests run only when selected (`-m slow`); CI's plain run skips them."""
    if request.node.get_closest_marker("slow") and "slow" not in (
        request.config.getoption("markexpr") or ""
    ):
        pytest.skip("slow: run with -m slow")


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    """Redis, one worker, one front end: {"redis", "worker", "server", "target"}."""
    d = tmp_path_factory.mktemp("load")
    rds = PersistentRedis(d, fsync="everysec").start()
    env = {
        "UNMASK_BROKER_URL": rds.url,
        "UNMASK_MODEL": str(tiny_model_dir),
        "UNMASK_MODEL_NAME": MODEL,
        "UNMASK_HEARTBEAT_S": "0.5",
        "UNMASK_MAX_BATCH": str(CONCURRENCY),
        "UNMASK_WORKER_CONCURRENCY": str(CONCURRENCY),
        "UNMASK_RESULT_TTL_S": "600",
        "UNMASK_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    worker = WorkerProcess(env, d / "worker.log").start()
    server = ServeProcess(None, d / "serve.log", env).start()
    try:
        target = f"127.0.0.1:{server.port}"
        with Client(target) as c:
            wait_until(lambda: _serving(c, worker), 120, "the worker and the front end", every=0.2)
        yield {"redis": rds, "worker": worker, "server": server, "target": target}
    finally:
        server.stop()
        worker.stop()
        rds.stop()


def _serving(c: Client, worker: WorkerProcess) -> bool:
    assert worker.proc.poll() is None, worker.tail()
    try:
        return c.health() == "SERVING"
    except ServiceError:
        return False


class MemorySampler:
    """Peak VmRSS of some processes, sampled every `every` seconds in a thread."""

    def __init__(self, pids: dict[str, int], every: float = 0.1) -> None:
        self.pids = pids
        self.every = every
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], proc_memory(pid)["VmRSS"])
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def _drive(target: str, n: int, concurrency: int) -> tuple[list[float], list, list[str]]:
    """n calls with `concurrency` in flight: (latencies, errors, job ids)."""
    latencies: list[float] = []
    errors: list[tuple[int, ServiceError]] = []
    job_ids: list[str] = []
    todo = iter(range(n))
    async with AsyncClient(target, timeout=300) as c:

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            kind = i % 10
            if kind < 2:  # streamed: the whole event stream, to the final event
                events = [e async for e in c.stream(f"Stream {i}", gen_length=16, steps=8,
                                                    block_length=8, seed=i)]  # fmt: skip
                assert events[0]["type"] == "accepted" and events[-1]["type"] == "final"
                job_ids.append(events[-1]["generation"].job_id)
            elif kind == 2:
                g = await c.infill(f"def f{i}(x):\n    return [MASK:6]\n", modality="code",
                                   steps=3, seed=i)  # fmt: skip
                job_ids.append(g.job_id)
            else:
                g = await c.generate(f"Request {i}", gen_length=16, steps=8, seed=i)
                assert g.text.startswith(f"Request {i}") and g.usage["generated_tokens"] == 16
                job_ids.append(g.job_id)
            latencies.append(time.perf_counter() - t0)

        async def lane() -> None:
            for i in todo:
                try:
                    await one(i)
                except ServiceError as exc:
                    errors.append((i, exc))

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return latencies, errors, job_ids


def run_load(stack: dict, n: int, concurrency: int = CONCURRENCY) -> dict:
    pids = {"server": stack["server"].proc.pid, "worker": stack["worker"].pid}
    r = redis.Redis.from_url(stack["redis"].url)
    before = {k.decode() for k in r.scan_iter("unmask:job:*:status", count=1000)}
    with MemorySampler(pids) as mem:
        t0 = time.perf_counter()
        latencies, errors, job_ids = asyncio.run(_drive(stack["target"], n, concurrency))
        wall = time.perf_counter() - t0
    hwm = {name: proc_memory(pid)["VmHWM"] for name, pid in pids.items()}
    report = {
        "requests": n, "concurrency": concurrency, "errors": len(errors),
        "wall_s": round(wall, 2), "throughput_rps": round(n / wall, 1),
        **{f"p{p}_s": round(percentile(latencies, p), 3) for p in (50, 95, 99)},
        "max_s": round(max(latencies), 3) if latencies else None,
        "server_peak_rss_mib": round(mem.peak["server"] / 2**20, 1),
        "worker_peak_rss_mib": round(mem.peak["worker"] / 2**20, 1),
        "server_vmhwm_mib": round(hwm["server"] / 2**20, 1),
        "worker_vmhwm_mib": round(hwm["worker"] / 2**20, 1),
        "redis_peak_mib": round(int(r.info("memory")["used_memory_peak"]) / 2**20, 1),
    }  # fmt: skip
    print("\nload:", " ".join(f"{k}={v}" for k, v in report.items()))
    assert not errors, f"{len(errors)} errors, first: {errors[:3]}"
    assert len(job_ids) == n == len(set(job_ids))
    # the ledger: every job accepted during the run has exactly one result and one completion
    accepted = {k.decode().split(":")[2] for k in r.scan_iter("unmask:job:*:status", count=1000)}
    accepted -= {k.split(":")[2] for k in before}
    assert accepted == set(job_ids), "jobs accepted but never answered, or answered twice"
    pipe = r.pipeline(transaction=False)
    for j in job_ids:
        pipe.get(protocol.completions_key(j))
        pipe.exists(protocol.result_key(j))
    flat = pipe.execute()
    assert all(int(c or 0) == 1 for c in flat[0::2]), "a job completed more than once"
    assert all(flat[1::2]), "a job has no stored result"
    r.close()
    assert report["p99_s"] < LATENCY_P99_LIMIT_S
    return report


def test_load_500_requests_at_concurrency_32_with_zero_errors(stack):
    run_load(stack, LOAD_REQUESTS)


@pytest.mark.slow
def test_load_2000_requests_at_concurrency_32_with_zero_errors(stack):
    run_load(stack, SLOW_REQUESTS)
