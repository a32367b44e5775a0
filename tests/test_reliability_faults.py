"""Faults: accepted work survives crashes, restarts and broken links, and runs exactly once.

Real infrastructure only: a private redis-server with the append-only file on (fsync always) on
a free port, real `unmask worker` processes, the real gRPC front end with the celery dispatcher.
The workers reach Redis through a TCP proxy (tests/tcp_proxy.py) so a test can cut that link.

After every scenario a ledger check: every job accepted during it (every job id whose status
key appeared in Redis) reached exactly one terminal status, stored exactly one result, wrote
exactly one final event and counted exactly one completion; none is missing.

Each scenario runs REPEATS times (default 2; UNMASK_FAULT_REPEATS overrides) in the default
run, and SLOW_REPEATS more times with `-m slow`.
A short heartbeat (0.5 s) makes the requeue of a killed worker's jobs quick (its restart time is
measured in test_worker_recovery.py); short limits (soft 6 s, hard 8 s, visibility 10 s) keep the
last-resort redelivery quick too.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from redis_fixtures import (
    PersistentRedis,
    WorkerProcess,
    retry_while_redis_down,
    wait_until,
    worker_env,
)
from tcp_proxy import TcpProxy

from unmask.client import Client, ServiceError
from unmask.engine.request import GenerationRequest
from unmask.models.sampler_params import SamplerParams
from unmask.service.server import ServerThread
from unmask.settings import Settings
from unmask.workers import protocol
from unmask.workers.client import JobQueue

MODEL = "tiny"
LIMITS = {"task_soft_time_limit_s": 6, "task_time_limit_s": 8, "visibility_timeout_s": 10}
CONCURRENCY = 4
REPEATS = int(os.environ.get("UNMASK_FAULT_REPEATS", "2"))  # runs of each scenario, default
SLOW_REPEATS = 3  # more runs of each, marked slow


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "attempt" in metafunc.fixturenames:
        runs = [*range(REPEATS)]
        slow = [
            pytest.param(i, marks=pytest.mark.slow) for i in range(REPEATS, REPEATS + SLOW_REPEATS)
        ]
        metafunc.parametrize("attempt", runs + slow)


@pytest.fixture(autouse=True)
def _slow_only_with_m_slow(request):
    """`slow` tests run only when selected (`-m slow`); CI's plain run skips them."""
    if request.node.get_closest_marker("slow") and "slow" not in (
        request.config.getoption("markexpr") or ""
    ):
        pytest.skip("slow: run with -m slow")


# ---- infrastructure -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aof_redis(tmp_path_factory):
    server = PersistentRedis(tmp_path_factory.mktemp("redis-aof")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(aof_redis):
    """The workers' only way to Redis."""
    with TcpProxy("127.0.0.1", aof_redis.port) as p:
        yield p


@pytest.fixture(scope="module")
def settings(aof_redis):
    return Settings(broker_url=aof_redis.url, model_name=MODEL, heartbeat_s=0.5,
                    result_ttl_s=600, batch_window=4, **LIMITS)  # fmt: skip


@pytest.fixture(scope="module")
def jobs(settings):
    with JobQueue(settings) as q:
        yield q


class Fleet:
    """Worker processes of the `tiny` model, connected through the proxy; `ensure()` keeps one
    running."""

    def __init__(self, proxy: TcpProxy, model_dir: Path, logdir: Path, jobs: JobQueue) -> None:
        self.env = worker_env(proxy.url(), model_dir, heartbeat_s=0.5, max_batch=CONCURRENCY,
                              **LIMITS)  # fmt: skip
        self.logdir = logdir
        self.jobs = jobs
        self.all: list[WorkerProcess] = []

    def start(self) -> WorkerProcess:
        log = self.logdir / f"worker-{len(self.all)}.log"
        args = ("--model-name", MODEL, "--concurrency", str(CONCURRENCY))
        w = WorkerProcess(self.env, log, args).start()
        self.all.append(w)
        w.wait_ready(lambda: retry_while_redis_down(lambda: self.jobs.live_workers(MODEL)))
        return w

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.all if w.proc is not None and w.proc.poll() is None]

    def ensure(self) -> WorkerProcess:
        live = self.alive()
        return live[-1] if live else self.start()

    def stop(self) -> None:
        for w in self.all:
            w.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {w.log.name}\n{w.tail(30)}" for w in self.all)


@pytest.fixture(scope="module")
def fleet(proxy, tiny_model_dir, tmp_path_factory, jobs):
    f = Fleet(proxy, tiny_model_dir, tmp_path_factory.mktemp("workers"), jobs)
    f.start()
    yield f
    f.stop()


def _req(i: int, length: int = 48) -> GenerationRequest:
    params = SamplerParams(gen_length=length, steps=length, stop_at_eos=False, seed=i)
    return GenerationRequest("text", prompt=f"Job {i}", model=MODEL, params=params)


def _status_ids(r: redis.Redis) -> set[str]:
    """Every job id that has a status key: every job a submit accepted."""
    return {k.decode().split(":")[2] for k in r.scan_iter("unmask:job:*:status", count=1000)}


def _running(r: redis.Redis, ids: list[str], n: int = 1, steps: int = 4) -> bool:
    return sum(r.xlen(protocol.events_key(j)) >= steps for j in ids) >= n


class Ledger:
    """Jobs accepted during a scenario, and the check that each ended exactly once."""

    def __init__(self, jobs: JobQueue) -> None:
        self.jobs = jobs
        self.r = jobs._redis
        self.before = _status_ids(self.r)
        self.ids: list[str] = []

    def submit(self, req: GenerationRequest) -> str:
        self.ids.append(self.jobs.submit(req))
        return self.ids[-1]

    def check(
        self, timeout: float = 90.0, allowed: tuple[str, ...] = (protocol.SUCCEEDED,),
        extra_allowed: dict[str, tuple[str, ...]] | None = None, fleet: Fleet | None = None,
    ) -> dict[str, dict]:  # fmt: skip
        """Wait for every accepted job's result, then check the exactly-once ledger."""
        accepted = retry_while_redis_down(lambda: _status_ids(self.r)) - self.before
        missing = set(self.ids) - accepted
        assert not missing, f"submitted jobs without a status key: {missing}"
        end = time.monotonic() + timeout
        results = {}
        for job_id in sorted(accepted):
            remaining = max(0.1, end - time.monotonic())
            try:
                results[job_id] = retry_while_redis_down(
                    lambda j=job_id, t=remaining: self.jobs.result(j, t)
                )
            except protocol.ResultTimeout:
                status = retry_while_redis_down(lambda j=job_id: self.jobs.status(j))
                logs = fleet.logs() if fleet is not None else ""
                pytest.fail(f"job {job_id} lost: no result after {timeout}s ({status})\n{logs}")
        # settle: no message left queued or delivered-but-unacknowledged (kombu's `unacked`
        # hash), so a late duplicate run could not still add a completion after the check
        wait_until(lambda: retry_while_redis_down(lambda: self.r.llen(protocol.queue_name(MODEL)) == 0
                                  and self.r.hlen("unacked") == 0), 60, "the queue to drain")  # fmt: skip
        for job_id, res in results.items():
            ok = (extra_allowed or {}).get(job_id, allowed)
            assert res.status in ok, (job_id, res.status, res.error)
            assert res.status in protocol.TERMINAL
            pipe = self.r.pipeline(transaction=False)
            pipe.get(protocol.completions_key(job_id))
            pipe.get(protocol.status_key(job_id))
            pipe.xrange(protocol.events_key(job_id))
            completions, status, events = pipe.execute()
            assert int(completions or 0) == 1, f"job {job_id}: {completions} completions"
            assert (status or b"").decode() == res.status, "status key != stored result"
            finals = [e for _, f in events if (e := protocol.decode_event(f))["type"] == "final"]
            assert len(finals) == 1, f"job {job_id}: {len(finals)} final events"
            assert finals[0]["status"] == res.status
            blobs = {k.decode().split(":")[4] for k in self.r.scan_iter(
                f"unmask:job:{job_id}:blob:*")}  # fmt: skip
            assert len(blobs) <= 1, f"job {job_id}: payloads of {len(blobs)} runs kept"
        return results


# ---- a worker dies or stops -----------------------------------------------------------------
def test_kill_9_a_worker_mid_job_loses_nothing(fleet, jobs, attempt):
    victim = fleet.ensure()
    ledger = Ledger(jobs)
    ids = [ledger.submit(_req(i)) for i in range(CONCURRENCY + 2)]  # 2 wait in the queue
    wait_until(lambda: _running(jobs._redis, ids), 30, "a job to be stepping")
    victim.kill9()
    interrupted = [j for j in ids if not jobs._redis.exists(protocol.result_key(j))]
    assert interrupted, "every job finished before the kill: make the jobs longer"
    ids += [ledger.submit(_req(100 + i, 8)) for i in range(2)]  # accepted with no worker alive
    fleet.start()
    results = ledger.check(fleet=fleet)
    assert all(r.status == protocol.SUCCEEDED for r in results.values())
    assert any(jobs.status(j)["runs"] == 2 for j in interrupted), "nothing ran twice?"


def test_warm_shutdown_mid_job_finishes_running_jobs_and_requeues_the_rest(fleet, jobs, attempt):
    worker = fleet.ensure()
    ledger = Ledger(jobs)
    ids = [ledger.submit(_req(i)) for i in range(CONCURRENCY + 2)]
    wait_until(lambda: _running(jobs._redis, ids), 30, "a job to be stepping")
    running = [j for j in ids if jobs.status(j)["status"] == protocol.RUNNING]
    worker.proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown
    assert worker.proc.wait(30) == 0, worker.tail()
    assert running
    for j in running:  # the jobs it was running finished there, before it exited
        assert jobs.status(j)["status"] == protocol.SUCCEEDED, worker.tail()
    ids += [ledger.submit(_req(100 + i, 8)) for i in range(2)]
    fleet.start()
    ledger.check(fleet=fleet)
    assert all(jobs.status(j)["runs"] == 1 for j in ids), "a job ran twice"


def test_a_job_delivered_again_while_it_runs_completes_once_newest_delivery_wins(
    fleet, jobs, attempt
):
    """What Celery does when a worker's broker connection drops mid-run (the job is handed out
    again while the first run goes on), made deterministic: deliver the same job id twice."""
    fleet.ensure()
    ledger = Ledger(jobs)
    req = _req(7, 64)
    job_id = ledger.submit(req)
    wait_until(lambda: _running(jobs._redis, [job_id], steps=6), 30, "the first run to step")
    jobs.submit(req)  # the second delivery
    ledger.check(fleet=fleet)
    assert jobs.status(job_id)["runs"] == 2 and jobs.status(job_id)["deliveries"] == 2
    events = [protocol.decode_event(f) for _, f in jobs._redis.xrange(protocol.events_key(job_id))]
    last_run = events[max(i for i, e in enumerate(events) if e["type"] == "accepted") :]
    steps = [e["step"] for e in last_run if e["type"] == "step"]
    assert len(steps) == 64 and steps == sorted(steps), (
        "the old run wrote into the new run's events"
    )


# ---- Redis restarts -------------------------------------------------------------------------
def test_redis_restarted_while_jobs_are_queued_and_running(fleet, jobs, aof_redis, attempt):
    fleet.ensure()
    ledger = Ledger(jobs)
    ids = [ledger.submit(_req(i)) for i in range(2 * CONCURRENCY)]
    wait_until(lambda: _running(jobs._redis, ids), 30, "a job to be stepping")
    assert jobs.queue_length(MODEL) > 0, "no job left in the queue: submit more"
    aof_redis.kill9()  # no graceful save: only the append-only file survives
    time.sleep(1.0)
    aof_redis.start()
    ledger.check(fleet=fleet)
    assert fleet.alive(), "the worker did not survive the Redis restart"


# ---- the worker's link to Redis breaks ------------------------------------------------------
@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_worker_redis_link_cut_and_restored(fleet, jobs, proxy, mode, attempt):
    fleet.ensure()
    ledger = Ledger(jobs)
    ids = [ledger.submit(_req(i)) for i in range(CONCURRENCY + 2)]
    wait_until(lambda: _running(jobs._redis, ids), 30, "a job to be stepping")
    proxy.cut(mode)
    time.sleep(3.0)
    ids.append(ledger.submit(_req(100, 8)))  # accepted while the worker is cut off
    proxy.restore()
    ledger.check(fleet=fleet)
    assert fleet.alive(), "the worker did not survive the cut"


# ---- the front end ----------------------------------------------------------------------------
def test_front_end_restarted_while_jobs_are_queued(fleet, jobs, settings, attempt):
    fleet.ensure()
    ledger = Ledger(jobs)
    rows = [{"custom_id": f"item-{i}", "body": {"prompt": f"Item {i}", "params": {
        "gen_length": 32, "steps": 32, "stop_at_eos": False}}} for i in range(10)]  # fmt: skip
    calls: list[object] = []
    first = ServerThread(settings)
    first.start()
    try:
        with Client(f"127.0.0.1:{first.port}", timeout=60) as c:
            batch = c.submit_batch(rows)

            def call(i: int) -> None:  # in flight when the front end goes away
                try:
                    calls.append(c.generate(f"Call {i}", gen_length=32, steps=32))
                except ServiceError as exc:
                    calls.append(exc)

            threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            wait_until(lambda: c.get_batch(batch.id).counts["pending"] < 10, 30, "items to run")
            assert c.get_batch(batch.id).counts["pending"] > 0, "the batch finished: make it longer"
    finally:
        first.stop()
    for t in threads:
        t.join(30)
    assert len(calls) == 3
    with ServerThread(settings) as second, Client(f"127.0.0.1:{second.port}") as c:
        done = c.wait_batch(batch.id, timeout=120)
        assert done.status == "completed" and done.counts["succeeded"] == 10, done.counts
        items = {r["custom_id"]: r for r in c.batch_results(batch.id)}
    assert set(items) == {r["custom_id"] for r in rows}
    item_jobs = {r["response"]["job_id"] for r in items.values()}
    # the interrupted calls' jobs finish or are cancelled (their callers went away): one end each
    others = {j: (protocol.SUCCEEDED, protocol.CANCELLED) for j in _status_ids(jobs._redis)
              - ledger.before - item_jobs}  # fmt: skip
    ledger.check(extra_allowed=others, fleet=fleet)
    assert item_jobs <= _status_ids(jobs._redis)


def test_broker_unreachable_at_submit_is_unavailable_fast_then_recovers(
    fleet, jobs, settings, aof_redis, attempt
):
    fleet.ensure()
    ledger = Ledger(jobs)
    with TcpProxy("127.0.0.1", aof_redis.port) as link:
        front = settings.with_overrides(broker_url=link.url())
        with ServerThread(front) as srv, Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            assert c.generate("warm", gen_length=8, steps=2).text  # connections are pooled now
            for mode in ("reset", "blackhole"):
                link.cut(mode)
                before = _status_ids(jobs._redis)
                for call in (lambda: c.generate("x", gen_length=8, steps=2),
                             lambda: list(c.stream("x", gen_length=8, steps=2)),
                             lambda: c.submit_batch([{"custom_id": "a", "body": {"prompt": "x"}}]),
                             lambda: c.list_models()):  # fmt: skip
                    t0 = time.monotonic()
                    with pytest.raises(ServiceError) as err:
                        call()
                    elapsed = time.monotonic() - t0
                    assert err.value.code == "UNAVAILABLE", (mode, err.value)
                    assert "unreachable" in err.value.message
                    assert elapsed < 6.0, f"{mode}: {elapsed:.1f}s to refuse"
                wait_until(lambda: c.health() == "NOT_SERVING", 15, "NOT_SERVING", every=0.2)
                assert _status_ids(jobs._redis) == before, "a refused call left a job behind"
                link.restore()
                wait_until(lambda: c.health() == "SERVING", 15, "SERVING again", every=0.2)
                assert c.generate("back", gen_length=8, steps=2).text.startswith("back")
    ledger.check(fleet=fleet)
