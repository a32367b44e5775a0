"""Redis restarted while jobs run: every job completes once, within seconds of Redis coming back.

Real infrastructure only: private redis-server processes and real `unmask worker` processes.
- a restart: the server (append-only file on, as compose runs it) stopped with SIGTERM while the
  worker's jobs are stepping, started again 3 s later on the same port and data directory;
- the race that a restart loses now and then (docs/reliability.md, bug 5), forced: the worker
  loses Redis for 1 s on every connection but its Celery consumer's, so its running jobs give
  their messages back while kombu cannot reach Redis (kombu logs "Couldn't reject") and their
  claims cannot be released;
- kombu 5.7.0's AttributeError on a channel that outlived its connection (celery_app.py).
The visibility timeout stays at 600 s, so a job that completes within seconds was not rescued by
kombu's last-resort restore: its worker requeued what it could not hand back while Redis was
away (workers/recovery.py, settle). The times are printed (`-s` shows them).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import redis
from redis_fixtures import (
    PersistentRedis,
    RedisServer,
    WorkerProcess,
    retry_while_redis_down,
    wait_until,
    worker_env,
)
from tcp_proxy import TcpProxy, _reset

from unmask.engine.request import GenerationRequest
from unmask.models.sampler_params import SamplerParams
from unmask.settings import Settings
from unmask.workers import protocol, recovery
from unmask.workers.client import JobQueue

MODEL = "tiny"
JOBS = 6
CONCURRENCY = 4
DOWN_S = 3.0  # long enough that every running job's next write to Redis fails
DONE_WITHIN_S = 30.0  # after the restart; the visibility timeout (600 s) is far beyond it
VISIBILITY_S = 600


def _start_worker(broker_url: str, model_dir: Path, log: Path) -> WorkerProcess:
    """One worker, CONCURRENCY jobs at a time, heartbeat 0.5 s, visibility timeout VISIBILITY_S."""
    env = worker_env(broker_url, model_dir, heartbeat_s=0.5, max_batch=CONCURRENCY,
                     visibility_timeout_s=VISIBILITY_S)  # fmt: skip
    return WorkerProcess(
        env, log, ("--model-name", MODEL, "--concurrency", str(CONCURRENCY))
    ).start()


def _settings(broker_url: str) -> Settings:
    return Settings(broker_url=broker_url, model_name=MODEL, heartbeat_s=0.5,
                    visibility_timeout_s=VISIBILITY_S)  # fmt: skip


def _req(i: int) -> GenerationRequest:
    params = SamplerParams(gen_length=64, steps=64, stop_at_eos=False, seed=i)
    return GenerationRequest("text", prompt=f"Restart {i}", model=MODEL, params=params)


@pytest.fixture
def aof_redis(tmp_path):
    server = PersistentRedis(tmp_path).start()
    yield server
    server.stop()


def test_jobs_running_through_a_redis_restart_complete_once_within_seconds(
    aof_redis, tiny_model_dir, tmp_path
):
    settings = _settings(aof_redis.url)
    worker = _start_worker(aof_redis.url, tiny_model_dir, tmp_path / "worker.log")
    try:
        with JobQueue(settings) as jobs:
            worker.wait_ready(lambda: jobs.live_workers(MODEL))
            r = jobs._redis
            ids = [jobs.submit(_req(i)) for i in range(JOBS)]
            wait_until(lambda: sum(r.xlen(protocol.events_key(j)) >= 3 for j in ids) >= 2,
                       60, "two jobs to be stepping")  # fmt: skip
            aof_redis.stop_gracefully()
            time.sleep(DOWN_S)
            aof_redis.start()
            _check_all_done_once(jobs, ids, time.monotonic(), worker, f"Redis down {DOWN_S} s")
    finally:
        worker.stop()


def _check_all_done_once(
    jobs: JobQueue, ids: list[str], t0: float, worker: WorkerProcess, what: str
) -> None:
    """Every job has its result within DONE_WITHIN_S of t0, succeeded, ran to the end once; every
    message is acknowledged; the worker is alive. Prints how long the last job took."""
    r = jobs._redis
    done: dict[str, float] = {}

    def all_done() -> bool:
        for j in ids:
            if j not in done and retry_while_redis_down(
                lambda j=j: r.exists(protocol.result_key(j))
            ):
                done[j] = time.monotonic() - t0
        return len(done) == len(ids)

    try:
        wait_until(all_done, DONE_WITHIN_S, "every job's result", every=0.1)
    except AssertionError:
        where = {j: _where(r, j) for j in ids if j not in done}
        raise AssertionError(f"not done: {where}\n{worker.tail(60)}") from None
    print(f"\n{what}: all {len(ids)} jobs done {max(done.values()):.1f} s after Redis was back")
    for j in ids:
        res = jobs.result(j, timeout=10)
        assert res.status == protocol.SUCCEEDED, res.error
        assert jobs.completions(j) == 1, (j, jobs.status(j))
        finals = [e for _, e in jobs.events(j, timeout=10) if e["type"] == "final"]
        assert len(finals) == 1
    wait_until(lambda: r.hlen(recovery.UNACKED) == 0 and r.llen(protocol.queue_name(MODEL)) == 0,
               20, "every message acknowledged")  # fmt: skip
    assert worker.proc is not None and worker.proc.poll() is None, worker.tail(60)


def _where(r: redis.Redis, job_id: str) -> str:
    """Where Redis holds a job that has no result: the queue, kombu's `unacked` hash, a claim."""
    places = []
    if any(job_id.encode() in m for m in r.lrange(protocol.queue_name(MODEL), 0, -1)):
        places.append("queue")
    if any(job_id.encode() in m for m in r.hvals(recovery.UNACKED)):
        places.append("unacked")
    if any(job_id.encode() in c for c in r.hvals(protocol.inflight_key(MODEL))):
        places.append("claimed")
    return "+".join(places) or "nowhere"


class ConsumerSparingProxy(TcpProxy):
    """A TcpProxy whose cut can spare some connections: `cut_all_but(addrs)` resets every other
    connection and refuses new ones, so Redis is unreachable for everything but the Celery
    consumer's event loop (`addrs`: its connections' addresses as Redis lists them)."""

    def cut_all_but(self, addrs: set[str]) -> None:
        with self._lock:
            self.mode = "reset"
            spared = [(a, b) for a, b in self._pairs if _addr(b) in addrs]
            cut = [p for p in self._pairs if p not in spared]
            self._pairs = spared
        assert len(spared) == len(addrs), f"the proxy does not carry all of {addrs}"
        for a, b in cut:
            _reset(a)
            _reset(b)


def _addr(s: socket.socket) -> str:
    try:
        host, port = s.getsockname()[:2]
        return f"{host}:{port}"
    except OSError:
        return ""


def _consumer_addrs(r: redis.Redis) -> set[str]:
    """The addresses (as Redis lists them) of the Celery consumer's connections that its event
    loop watches: the one in BRPOP (the task queue) and the one subscribed (remote control)."""
    clients = r.client_list()
    brpop = {c["addr"] for c in clients if c.get("cmd") == "brpop"}
    subscribed = {c["addr"] for c in clients if "P" in c.get("flags", "")}
    return brpop | subscribed if brpop else set()


def test_a_job_given_back_while_redis_is_unreachable_runs_again_within_seconds(
    tiny_model_dir, tmp_path
):
    """The worker's Celery consumer keeps its connection, everything else of the worker loses
    Redis: running jobs give their messages back (Reject, requeue) while kombu cannot reach
    Redis, and their claims cannot be released. Once Redis is reachable again, the worker
    requeues them itself: every job completes once, within seconds, not after the visibility
    timeout (600 s)."""
    server = RedisServer(tmp_path).start()
    try:
        with ConsumerSparingProxy("127.0.0.1", server.port) as link:
            settings = _settings(server.url)
            worker = _start_worker(link.url(), tiny_model_dir, tmp_path / "worker.log")
            try:
                with JobQueue(settings) as jobs:
                    worker.wait_ready(lambda: jobs.live_workers(MODEL))
                    r = jobs._redis
                    ids = [jobs.submit(_req(i)) for i in range(JOBS)]
                    wait_until(lambda: sum(r.xlen(protocol.events_key(j)) >= 3 for j in ids)
                               >= 2, 60, "two jobs to be stepping")  # fmt: skip
                    consumer = wait_until(lambda: _consumer_addrs(r), 10,
                                          "the consumer's BRPOP connection")  # fmt: skip
                    link.cut_all_but(consumer)
                    time.sleep(1.0)  # < 3 heartbeats: the worker is not taken for lost
                    link.restore()
                    t0 = time.monotonic()
                    _check_all_done_once(jobs, ids, t0, worker, "Redis out of reach 1 s")
            finally:
                worker.stop()
    finally:
        server.stop()


def test_a_channel_that_outlived_its_broker_connection_raises_a_connection_error(tmp_path):
    """kombu 5.7.0 raised AttributeError ('NoneType' object has no attribute 'hostname') when a
    channel restored its unacknowledged messages after its connection had been closed, and the
    worker died of it; the app's transport (celery_app.RedisTransport) raises the connection
    error instead, which Celery's clean-up ignores."""
    from kombu.common import ignore_errors

    from unmask.workers.celery_app import RedisTransport, make_app

    server = RedisServer(tmp_path).start()
    try:
        app = make_app(Settings(broker_url=server.url, model_name=MODEL))
        with app.connection_for_read() as conn:
            assert isinstance(conn.transport, RedisTransport)
            channel = conn.channel()
            channel.client.ping()
            channel._disconnect_pools()  # what closing it does first
            conn._do_close_transport()  # what Celery's clean-up did to the connection
            with pytest.raises(redis.ConnectionError):
                channel.qos.restore_by_tag("a-delivery-tag")  # how it restores each message
            ignore_errors(conn, channel.close)  # as Celery closes it: no AttributeError
    finally:
        server.stop()
