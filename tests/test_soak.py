"""Soak: mixed traffic at concurrency 32 for minutes while workers are killed and Redis restarts.

Real parts only: an AOF redis-server, `unmask serve --broker` as its own process (its RSS is
measured), `unmask worker` processes of the tiny model. Clients run Generate, GenerateStream
(a third of the streams abandoned mid-read), SubmitBatch and CancelBatch in a loop; the worker is
killed with SIGKILL every SOAK_S / 5 seconds and a new one started; Redis is killed and restarted
once, half way. Pass: the front end never dies and ends SERVING, every client call either
succeeds or gets a typed status from the expected set, the exactly-once ledger holds for every
accepted job, and the front end's RSS is flat (last fifth vs second fifth).

Bounded and self-stopping; only with `-m slow`:
    UNMASK_SOAK_S=600 pytest -m slow tests/test_soak.py -s
It writes soak.json and soak_rss.png to UNMASK_SOAK_OUT (default: the test's tmp dir);
docs/reliability.md reports a run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from redis_fixtures import PersistentRedis, free_port, retry_while_redis_down, wait_until
from test_reliability_faults import MODEL, Fleet, Ledger, _status_ids

from unmask.client import Client, ServiceError
from unmask.workers import protocol
from unmask.workers.client import JobQueue

SOAK_S = float(os.environ.get("UNMASK_SOAK_S", "600"))
CONCURRENCY = 32
# statuses a call may meet while workers die and Redis restarts; anything else fails the soak
EXPECTED = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED"}
SMALL = {"gen_length": 16, "steps": 8, "stop_at_eos": False}
CALL_TIMEOUT_S = 60.0

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _slow_only_with_m_slow(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("soak: run with -m slow")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class FrontEnd:
    """`unmask serve --broker …` as a subprocess, so a crash is seen and its memory measured."""

    def __init__(self, broker_url: str, log: Path) -> None:
        self.port = free_port()
        self.log = log
        env = {**os.environ, "UNMASK_MODEL_NAME": MODEL, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "unmask", "serve", "--broker", broker_url,
               "--host", "127.0.0.1", "--port", str(self.port), "--model-name", MODEL]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def health(self) -> str:
        try:
            with Client(self.target) as c:
                return c.health(timeout=2.0)
        except Exception:  # not up yet, or gone: the caller decides
            return "UNKNOWN"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Traffic:
    """CONCURRENCY client threads doing a mix of calls until `stop` is set."""

    OPS = ("generate", "stream", "stream", "stream_abandon", "batch", "batch_cancel")

    def __init__(self, target: str) -> None:
        self.target = target
        self.stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.untyped: list[str] = []
        self.batches: list[str] = []
        self._lock = threading.Lock()

    def _record(self, op: str, outcome: str) -> None:
        with self._lock:
            self.outcomes[f"{op}:{outcome}"] += 1

    def _one(self, c: Client, op: str, n: int) -> None:
        prompt = f"soak {n}"
        if op == "generate":
            c.generate(prompt, timeout=CALL_TIMEOUT_S, **SMALL)
        elif op == "stream":
            for _ in c.stream(prompt, timeout=CALL_TIMEOUT_S, **SMALL):
                pass
        elif op == "stream_abandon":
            events = c.stream(prompt, timeout=CALL_TIMEOUT_S, **SMALL)
            next(events)
            events.close()  # the client walks away mid-stream
        else:
            rows = [{"custom_id": f"s{n}-{i}", "body": {"prompt": prompt, "params": SMALL}}
                    for i in range(3)]  # fmt: skip
            job = c.submit_batch(rows)
            with self._lock:
                self.batches.append(job.id)
            if op == "batch_cancel":
                c.cancel_batch(job.id)

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        with Client(self.target) as c:
            n = 0
            while not self.stop.is_set():
                op, n = rng.choice(self.OPS), n + 1
                try:
                    self._one(c, op, seed * 100_000 + n)
                    self._record(op, "OK")
                except ServiceError as e:
                    self._record(op, e.code)
                    if e.code not in EXPECTED:
                        with self._lock:
                            self.untyped.append(f"{op}: {e.code} {e}")
                    time.sleep(0.2)  # back off while the stack recovers
                except Exception as e:  # untyped: a bug in the client or the server
                    self._record(op, type(e).__name__)
                    with self._lock:
                        self.untyped.append(f"{op}: {type(e).__name__}: {e}")
                    time.sleep(0.2)


def _ledger(jobs: JobQueue, before: set[str], timeout: float = 300.0) -> dict[str, dict]:
    """The fault suite's exactly-once ledger, in bulk (thousands of jobs): every job accepted
    during the soak has one terminal result, one completion, one final event, at most one run's
    payloads; none is missing once the queue and kombu's `unacked` hash have drained."""
    r = jobs._redis
    wait_until(lambda: retry_while_redis_down(lambda: r.llen(protocol.queue_name(MODEL)) == 0
                              and r.hlen("unacked") == 0), timeout, "the queue to drain")  # fmt: skip
    accepted = sorted(_status_ids(r) - before)
    wait_until(lambda: all(r.exists(protocol.result_key(j)) for j in accepted), 60,
               "every accepted job's result")  # fmt: skip
    runs_with_blobs: dict[str, set[str]] = {}
    for k in r.scan_iter("unmask:job:*:blob:*", count=1000):
        parts = k.decode().split(":")
        runs_with_blobs.setdefault(parts[2], set()).add(parts[4])
    results: dict[str, dict] = {}
    for i in range(0, len(accepted), 500):
        chunk = accepted[i : i + 500]
        pipe = r.pipeline(transaction=False)
        for j in chunk:
            pipe.get(protocol.result_key(j))
            pipe.get(protocol.completions_key(j))
            pipe.xrange(protocol.events_key(j))
        values = pipe.execute()
        for n, j in enumerate(chunk):
            raw, completions, events = values[3 * n : 3 * n + 3]
            assert raw is not None, f"job {j} lost: accepted, no result"
            res = json.loads(raw)
            assert res["status"] in protocol.TERMINAL, (j, res["status"])
            assert int(completions or 0) == 1, f"job {j}: {completions} completions"
            finals = [e for _, f in events if (e := protocol.decode_event(f))["type"] == "final"]
            assert len(finals) == 1, f"job {j}: {len(finals)} final events"
            assert len(runs_with_blobs.get(j, ())) <= 1, f"job {j}: payloads of several runs"
            results[j] = res
    return results


def _plot(samples: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(t, [s["server_mb"] for s in samples], label="front end (unmask serve)")
    ax.plot(t, [s["worker_mb"] for s in samples], label="worker (restarted after each kill)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MB")
    ax.set_title(f"soak: {CONCURRENCY} clients, worker kill -9 every {SOAK_S / 5:.0f} s")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def test_soak_mixed_traffic_with_worker_kills_and_a_redis_restart(tmp_path, tiny_model_dir):
    out = Path(os.environ.get("UNMASK_SOAK_OUT", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    aof = PersistentRedis(
        tmp_path / "redis"
    )  # fsync always: with everysec (compose.yaml) a kill -9 may drop up to 1 s of accepted writes
    (tmp_path / "redis").mkdir()
    aof.start()
    direct = type("Direct", (), {"url": lambda self: aof.url})()  # the workers' way to Redis
    front = FrontEnd(aof.url, tmp_path / "serve.log")
    from unmask.settings import Settings

    settings = Settings(broker_url=aof.url, model_name=MODEL, heartbeat_s=0.5, result_ttl_s=3600)
    with JobQueue(settings) as jobs:
        fleet = Fleet(direct, tiny_model_dir, tmp_path, jobs)
        # results must outlive the soak and its check (the fault suite's 600 s do not)
        fleet.env["UNMASK_RESULT_TTL_S"] = "3600"
        try:
            fleet.start()
            wait_until(lambda: front.health() == "SERVING", 60, "the front end to serve")
            ledger = Ledger(jobs)
            traffic = Traffic(front.target)
            threads = [threading.Thread(target=traffic.worker, args=(i,), daemon=True)
                       for i in range(CONCURRENCY)]  # fmt: skip
            samples: list[dict] = []
            t0 = time.monotonic()
            for th in threads:
                th.start()
            kill_every, next_kill, redis_restarted, events = SOAK_S / 5, SOAK_S / 5, False, []
            while (now := time.monotonic() - t0) < SOAK_S:
                assert front.proc.poll() is None, f"the front end died:\n{front.log.read_text()}"
                live = fleet.alive()
                samples.append({
                    "t": round(now, 1), "server_mb": rss_mb(front.proc.pid),
                    "worker_mb": rss_mb(live[-1].pid) if live else None,
                })  # fmt: skip
                if now >= next_kill:
                    fleet.ensure().kill9()
                    events.append({"t": round(now, 1), "event": "worker kill -9"})
                    fleet.start()
                    next_kill += kill_every
                if not redis_restarted and now >= SOAK_S / 2:
                    aof.kill9()
                    time.sleep(1.0)
                    aof.start()
                    events.append({"t": round(now, 1), "event": "redis kill -9 + restart"})
                    redis_restarted = True
                time.sleep(2.0)
            traffic.stop.set()
            for th in threads:
                th.join(CALL_TIMEOUT_S + 30)
            assert not any(th.is_alive() for th in threads), "a client call hung"
            fleet.ensure()  # whatever was accepted must finish
            results = _ledger(jobs, ledger.before)
            r = redis.Redis.from_url(aof.url)
            for batch_id in traffic.batches:  # every accepted batch ends
                wait_until(lambda b=batch_id: retry_while_redis_down(lambda: (r.hget(f"unmask:batch:{b}", "status")
                           or b"").decode() in ("completed", "cancelled", "failed")), 120,
                           f"batch {batch_id} to end")  # fmt: skip
            assert front.proc.poll() is None, "the front end died"
            assert front.health() == "SERVING"
        finally:
            traffic_stop = locals().get("traffic")
            if traffic_stop is not None:
                traffic_stop.stop.set()
            fleet.stop()
            front.stop()
            aof.stop()

    server = [s["server_mb"] for s in samples if s["server_mb"]]
    fifth = max(1, len(server) // 5)
    early = sum(server[fifth : 2 * fifth]) / fifth
    late = sum(server[-fifth:]) / fifth
    summary = {
        "seconds": SOAK_S, "concurrency": CONCURRENCY, "calls": dict(traffic.outcomes),
        "accepted_jobs": len(results), "job_statuses": dict(Counter(
            res["status"] for res in results.values())),
        "batches": len(traffic.batches), "events": events, "untyped": traffic.untyped[:20],
        "server_rss_mb": {"second_fifth": round(early, 1), "last_fifth": round(late, 1)},
        "samples": samples,
    }  # fmt: skip
    (out / "soak.json").write_text(json.dumps(summary, indent=1))
    _plot(samples, out / "soak_rss.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    assert not traffic.untyped, traffic.untyped[:10]
    assert late <= early * 1.2 + 10, f"front-end RSS grew: {early:.0f} -> {late:.0f} MB"
