"""Clients that abandon server-streaming calls must neither crash the server nor leave anything
behind. Each streaming method (GenerateStream, StreamJobResults) is abandoned over and over, in
four ways in turn: the channel closed mid-read, a 1 ms deadline, the connection reset by a TCP
proxy mid-read, and a client process killed (SIGKILL) mid-read. Meanwhile health must stay
SERVING; afterwards every job has ended and what served it is gone (the dispatcher's job table,
the Engine's event-pump threads, the handlers' tasks, the servicer contexts, the Redis stream
readers), and the server still answers.

Real parts only: gRPC on loopback, the tiny random model in the Engine (embedded) or in an
`unmask worker` process behind a private redis-server (broker).

The regression: grpc.aio never closes an async-generator handler whose client went away while a
message was being written; asyncio's garbage-collector hook closed it later, after the call had
ended, and the request-id interceptor's log line then read `context.peer()` of the ended call: a
segfault in cygrpc (grpcio 1.81 to 1.85.3, at least) after a few aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import signal
import subprocess
import sys
import threading

import grpc
import pytest
import redis
from redis_fixtures import WorkerProcess, redis_server, wait_until  # noqa: F401
from tcp_proxy import TcpProxy

from unmask.client import Client, generate_request
from unmask.service.server import ServerThread
from unmask.settings import Settings
from unmask.v1 import unmask_pb2 as pb
from unmask.v1 import unmask_pb2_grpc as pb_grpc

MODEL = "tiny"
ABORTS = 200  # per streaming method, in each mode
RESULTS = 150  # items of the finished batch whose results are streamed (two pages)
# a job long enough to be abandoned mid-way, short enough not to matter if it is not
STREAM = {"gen_length": 32, "steps": 32, "stop_at_eos": False}

# ---- four ways to abandon a stream -----------------------------------------------------------

KILLED_CLIENT = """
import sys, time
import grpc
from unmask.v1 import unmask_pb2 as pb, unmask_pb2_grpc as pb_grpc

target, method, n, raw = sys.argv[1], sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
request = getattr(pb, sys.argv[5]).FromString(raw)
channels = [grpc.insecure_channel(target) for _ in range(n)]
calls = [getattr(pb_grpc.UnmaskStub(ch), method)(request, timeout=60) for ch in channels]
for call in calls:
    next(call)
print("reading", flush=True)
time.sleep(60)
"""


class Aborter:
    """Abandons calls of one streaming method, in four ways in turn; counts them."""

    def __init__(self, target: str, proxy: TcpProxy, method: str, request) -> None:
        self.target = target
        self.proxy = proxy
        self.method = method
        self.request = request
        self.channel = grpc.insecure_channel(target)  # warm: a 1 ms call reaches the server
        self.counts = {"closed": 0, "deadline": 0, "reset": 0, "killed": 0}

    def _call(self, channel: grpc.Channel, timeout: float):
        return getattr(pb_grpc.UnmaskStub(channel), self.method)(self.request, timeout=timeout)

    def close_mid_read(self, n: int) -> None:
        """Read the first message, then close the channel under the open call."""
        for _ in range(n):
            channel = grpc.insecure_channel(self.target)
            try:
                next(self._call(channel, 60))
            finally:
                channel.close()
            self.counts["closed"] += 1

    def deadline(self, n: int) -> None:
        for _ in range(n):
            with pytest.raises(grpc.RpcError) as err:
                for _ in self._call(self.channel, 0.001):
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
            self.counts["deadline"] += 1

    def reset_mid_read(self, n: int) -> None:
        """n calls through the proxy, each past its first message; then every connection is
        reset. (A short stream may have reached the client whole before the reset.)"""
        channel = grpc.insecure_channel(self.proxy.address)
        try:
            calls = [self._call(channel, 60) for _ in range(n)]
            for call in calls:
                next(call)
            self.proxy.cut("reset")
            for call in calls:
                with contextlib.suppress(grpc.RpcError):
                    for _ in call:
                        pass
        finally:
            self.proxy.restore()
            channel.close()
        self.counts["reset"] += n

    def kill_mid_read(self, n: int) -> None:
        """A client process with n calls open, each past its first message, killed -9."""
        args = [self.target, self.method, str(n), self.request.SerializeToString().hex(),
                type(self.request).__name__]  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line.strip() == b"reading", proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        self.counts["killed"] += n

    def run(self, total: int, health) -> dict[str, int]:
        """Abandon `total` calls, in rounds of every way; health is checked after each round."""
        ways = itertools.cycle([(self.close_mid_read, 8), (self.deadline, 6),
                                (self.reset_mid_read, 4), (self.kill_mid_read, 4)])  # fmt: skip
        done = 0
        while done < total:
            way, n = next(ways)
            n = min(n, total - done)
            way(n)
            done += n
            assert health() == "SERVING", (self.method, self.counts)
        self.channel.close()
        return self.counts


# ---- what the server holds -------------------------------------------------------------------


async def _other_tasks() -> int:
    return len(asyncio.all_tasks()) - 1


def _contexts() -> int:
    """grpc servicer contexts alive (each holds its call's core state)."""
    gc.collect()
    return sum(type(o).__name__ == "_ServicerContext" for o in gc.get_objects())


def _pump_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("unmask-job-")]


def _assert_no_errors_logged(caplog) -> None:
    """A client that goes away is not an error of the server's. (The records are dropped
    after: one with a traceback would keep the frames, and a call's context, alive.)"""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    caplog.clear()
    assert not errors, errors[:5]


def _health(client: Client):
    return lambda: client.health(timeout=10)


def _results_request(batch_id: str) -> pb.StreamJobResultsRequest:
    return pb.StreamJobResultsRequest(id=batch_id, follow=True)


def _finished_batch(client: Client) -> str:
    rows = [{"custom_id": f"r{i}", "body": {"prompt": "a", "params": {"gen_length": 2,
             "steps": 1}}} for i in range(RESULTS)]  # fmt: skip
    batch = client.submit_batch(rows)
    done = client.wait_batch(batch.id, timeout=120)
    assert done.counts["succeeded"] == RESULTS, done.counts
    return batch.id


# ---- embedded --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from unmask.models.generation import Generator

    return Generator.load(tiny_model_dir)


@pytest.fixture(scope="module")
def embedded(generator):
    settings = Settings(max_batch_items=RESULTS, batch_window=RESULTS)
    with ServerThread(settings, generator=generator) as srv:
        yield srv


@pytest.fixture
def proxy_to():
    proxies: list[TcpProxy] = []

    def make(port: int) -> TcpProxy:
        proxies.append(TcpProxy("127.0.0.1", port).start())
        return proxies[-1]

    yield make
    for p in proxies:
        p.stop()


def _embedded_idle(srv: ServerThread) -> bool:
    dispatcher = srv.server.dispatcher  # type: ignore[union-attr]
    return not dispatcher._jobs and dispatcher._engine.load == 0 and not _pump_threads()


@pytest.mark.parametrize("method", ["GenerateStream", "StreamJobResults"])
def test_embedded_server_survives_abandoned_streams_and_releases_every_job(
    embedded, proxy_to, method, caplog
):
    target = f"127.0.0.1:{embedded.port}"
    with Client(target, timeout=60) as client:
        if method == "GenerateStream":
            request = generate_request("Once upon a time", **STREAM)
        else:
            request = _results_request(_finished_batch(client))
        wait_until(lambda: _embedded_idle(embedded), 30, "the Engine to be idle")
        tasks, contexts = embedded.call(_other_tasks()), _contexts()

        counts = Aborter(target, proxy_to(embedded.port), method, request).run(
            ABORTS, _health(client)
        )

        assert sum(counts.values()) == ABORTS and all(counts.values()), counts
        _assert_no_errors_logged(caplog)
        wait_until(lambda: _embedded_idle(embedded), 60,
                   "every abandoned job to end and be forgotten, and its pump thread with it")  # fmt: skip
        wait_until(lambda: embedded.call(_other_tasks()) <= tasks, 30, "handler tasks to end")
        wait_until(lambda: _contexts() <= contexts, 30, "servicer contexts to be freed")
        assert not embedded.server.servicer._cancels  # type: ignore[union-attr]
        assert client.health() == "SERVING"
        events = list(client.stream("The end", gen_length=8, steps=2))
        assert events[-1]["type"] == "final" and events[-1]["generation"].text


def test_health_watch_streams_through_the_interceptors_and_survives_abandonment(embedded):
    """Health's Watch writes for itself (a coroutine, not a generator): the interceptors run it
    as it is (they used to iterate it, and every Watch ended UNKNOWN)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving = health_pb2.HealthCheckResponse.SERVING
    for _ in range(20):
        with grpc.insecure_channel(f"127.0.0.1:{embedded.port}") as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert next(watch).status == serving  # then the channel closes under it
    with Client(f"127.0.0.1:{embedded.port}") as client:
        assert client.health() == "SERVING"


# ---- broker: front end + worker process + redis-server --------------------------------------


@pytest.fixture(scope="module")
def settings(redis_server):  # noqa: F811
    return Settings(broker_url=redis_server.url, model_name=MODEL, heartbeat_s=0.5,
                    result_ttl_s=600, max_batch_items=RESULTS, batch_window=RESULTS)  # fmt: skip


@pytest.fixture(scope="module")
def worker(settings, tiny_model_dir, tmp_path_factory):
    from unmask.workers.client import JobQueue

    env = {"UNMASK_BROKER_URL": settings.broker_url, "UNMASK_MODEL": str(tiny_model_dir),
           "UNMASK_HEARTBEAT_S": str(settings.heartbeat_s), "UNMASK_DEVICE": "cpu",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    w = WorkerProcess(env, log, ("--model-name", MODEL, "--concurrency", "4")).start()
    jobs = JobQueue(settings)
    try:
        w.wait_ready(lambda: jobs.live_workers(MODEL))
        yield w
    finally:
        w.stop()
        jobs.close()


@pytest.fixture(scope="module")
def broker(settings, worker):
    with ServerThread(settings) as srv:
        yield srv


def _stream_readers(r: redis.Redis) -> list[dict]:
    """The front end's live job-event relays: connections blocked in XREAD, or that ran one
    within the last second (a relay blocks BLOCK_MS = 1 s at a time). A pooled connection
    whose last command was an XREAD long ago is idle, not a reader."""
    return [c for c in r.client_list() if c.get("cmd") == "xread"
            and ("b" in c.get("flags", "") or int(c.get("idle", 0)) < 2)]  # fmt: skip


def _queued(srv: ServerThread) -> int:
    models = srv.call(srv.server.dispatcher.models())  # type: ignore[union-attr]
    return sum(m.queue_length for m in models)


@pytest.mark.parametrize("method", ["GenerateStream", "StreamJobResults"])
def test_broker_front_end_survives_abandoned_streams_and_releases_every_reader(
    broker, settings, proxy_to, method, caplog
):
    target = f"127.0.0.1:{broker.port}"
    r = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    with Client(target, timeout=60) as client:
        client.wait_ready(timeout=30)
        if method == "GenerateStream":
            request = generate_request("Once upon a time", **STREAM)
        else:
            request = _results_request(_finished_batch(client))
        tasks, contexts = broker.call(_other_tasks()), _contexts()

        counts = Aborter(target, proxy_to(broker.port), method, request).run(
            ABORTS, _health(client)
        )

        assert sum(counts.values()) == ABORTS and all(counts.values()), counts
        _assert_no_errors_logged(caplog)
        wait_until(lambda: not _stream_readers(r), 30, "the Redis stream readers to close")
        wait_until(lambda: broker.call(_other_tasks()) <= tasks, 30, "handler tasks to end")
        wait_until(lambda: _contexts() <= contexts, 30, "servicer contexts to be freed")
        wait_until(lambda: _queued(broker) == 0, 60, "the abandoned jobs to leave the queue")
        assert not broker.server.servicer._cancels  # type: ignore[union-attr]
        assert client.health() == "SERVING"
        assert client.generate("The end", gen_length=8, steps=2).text
    r.close()


def test_stopping_the_front_end_right_after_abandoned_streams_still_cancels_their_jobs(
    settings, worker
):
    """The cancellations that abandoned calls start are carried out before the front end shuts
    down, and nothing is left pending on its event loop (such a task, a job's `cancel` waiting
    on the queue's thread pool, was "destroyed but pending" when the interpreter exited)."""
    from unmask.workers.client import JobQueue

    srv = ServerThread(settings)
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.UnmaskStub(ch)
            long = generate_request("x", gen_length=200, steps=200, stop_at_eos=False)
            calls = [stub.GenerateStream(long, timeout=60) for _ in range(4)]
            job_ids = [next(call).accepted.job_id for call in calls]
            for call in calls:
                call.cancel()
    finally:
        srv.stop()
    assert srv.loop.is_closed() and not asyncio.all_tasks(srv.loop)
    jobs = JobQueue(settings)
    try:
        wait_until(lambda: all(jobs.status(j)["status"] == "cancelled" for j in job_ids), 30,
                   "the abandoned jobs to be cancelled on the worker")  # fmt: skip
    finally:
        jobs.close()
