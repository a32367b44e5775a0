"""The gRPC front end with the celery dispatcher: a real redis-server, a real `unmask worker`
process, real gRPC on loopback. Few, focused tests (each worker start costs seconds); the
health test at the end stops the worker and starts another one.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import mido
import pytest
import redis
from redis_fixtures import WorkerProcess, free_port, redis_server, wait_until  # noqa: F401

from unmask.client import Client, ServiceError
from unmask.service.server import ServerThread
from unmask.settings import Settings

MODEL = "tiny"
SMALL = {"gen_length": 8, "steps": 2}


@pytest.fixture(scope="module")
def settings(redis_server):  # noqa: F811
    return Settings(broker_url=redis_server.url, model_name=MODEL, heartbeat_s=0.5,
                    result_ttl_s=600, batch_window=2)  # fmt: skip


class Workers:
    def __init__(self, settings: Settings, model_dir, logdir) -> None:
        self.env = {
            "UNMASK_BROKER_URL": settings.broker_url,
            "UNMASK_MODEL": str(model_dir),
            "UNMASK_HEARTBEAT_S": str(settings.heartbeat_s),
            "UNMASK_DEVICE": "cpu",
            "OMP_NUM_THREADS": "1",
        }
        self.logdir = logdir
        self.all: list[WorkerProcess] = []
        from unmask.workers.client import JobQueue

        self.jobs = JobQueue(settings)

    def start(self) -> WorkerProcess:
        log = self.logdir / f"worker-{len(self.all)}.log"
        w = WorkerProcess(self.env, log, ("--model-name", MODEL, "--concurrency", "4")).start()
        self.all.append(w)
        w.wait_ready(lambda: self.jobs.live_workers(MODEL))
        return w

    def stop(self) -> None:
        for w in self.all:
            w.stop()
        self.jobs.close()


@pytest.fixture(scope="module")
def workers(settings, tiny_model_dir, tmp_path_factory):
    w = Workers(settings, tiny_model_dir, tmp_path_factory.mktemp("workers"))
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def server(settings, workers):
    with ServerThread(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        c.wait_ready(timeout=30)
        yield c


def test_generate_stream_and_midi_through_a_worker(client):
    g = client.generate("Once", seed=2, **SMALL)
    assert g.text.startswith("Once") and g.usage["generated_tokens"] == 8
    events = list(client.stream("def f():", modality="code", gen_length=8, steps=4,
                                block_length=4))  # fmt: skip
    kinds = [e["type"] for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "final"
    assert kinds.count("step") == 4 and kinds.count("block") == 2
    assert events[-1]["generation"].text.startswith("def f():")
    song = client.midi(voices=2, n_bars=2, gen_length=24, steps=4, temperature=1.0, seed=0)
    mf = mido.MidiFile(file=io.BytesIO(song.midi))
    assert any(m.type == "note_on" for t in mf.tracks for m in t)
    bad = client.run  # a validation error never reaches the queue
    with pytest.raises(ServiceError) as err:
        client.generate("x", gen_length=8, steps=9)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field == "params.steps"
    with pytest.raises(ServiceError) as err:
        client.generate("x", model="not-served", **SMALL)
    assert err.value.code == "NOT_FOUND" and bad


def test_a_unary_call_sends_no_step_events_through_redis(client, settings):
    import redis

    from unmask.workers.protocol import decode_event, events_key

    g = client.generate("Once", seed=3, gen_length=8, steps=4, block_length=4)
    assert g.usage["generated_tokens"] == 8
    r = redis.Redis.from_url(settings.broker_url)
    kinds = [decode_event(f)["type"] for _, f in r.xrange(events_key(g.job_id))]
    r.close()
    assert kinds == ["accepted", "final"]  # nobody watches a unary call: no step, no block
    streamed = list(client.stream("Once", seed=3, gen_length=8, steps=4, block_length=4))
    assert [e["type"] for e in streamed].count("step") == 4  # a stream still sees every step
    assert streamed[-1]["generation"].text == g.text  # and the same tokens


def test_a_cancelled_call_cancels_the_job_on_the_worker(client, server):
    events = client.stream("x", gen_length=200, steps=200, stop_at_eos=False)
    job_id = next(events)["job_id"]
    events.close()
    dispatcher = server.server.dispatcher
    wait_until(lambda: server.call(dispatcher.status(job_id)) == "cancelled", 20,
               "the worker to cancel the job", every=0.1)  # fmt: skip


def test_batches_live_in_redis(client, settings, server):
    rows = [{"custom_id": f"c{i}", "body": {"prompt": f"Line {i}", "params": SMALL}}
            for i in range(3)]  # fmt: skip
    job = client.submit_batch(rows, idempotency_key="celery-1")
    assert client.submit_batch(rows, idempotency_key="celery-1").id == job.id
    job = client.wait_batch(job.id, timeout=60)
    assert job.status == "completed" and job.counts["succeeded"] == 3
    results = {r["custom_id"]: r for r in client.batch_results(job.id)}
    assert results["c2"]["response"]["text"].startswith("Line 2")
    r = redis.Redis.from_url(settings.broker_url)
    record = {k.decode(): v.decode() for k, v in r.hgetall(f"unmask:batch:{job.id}").items()}
    assert record["status"] == "completed" and record["succeeded"] == "3"
    assert r.hlen(f"unmask:batch:{job.id}:results") == 3
    # another front end on the same Redis sees the same batch
    with ServerThread(settings) as other, Client(f"127.0.0.1:{other.port}") as c2:
        assert c2.get_batch(job.id).counts == job.counts
        assert len(list(c2.batch_results(job.id))) == 3

    long = {"gen_length": 200, "steps": 200, "stop_at_eos": False}
    rows = [rows[0]] + [{"custom_id": f"long{i}", "body": {"prompt": "x", "params": long}}
                        for i in range(4)]  # fmt: skip
    job = client.submit_batch(rows)
    wait_until(lambda: client.get_batch(job.id).counts["succeeded"] >= 1, 60, "the short item")
    client.cancel_batch(job.id)
    job = client.wait_batch(job.id, timeout=60)
    assert job.status == "cancelled" and job.counts["pending"] == 0
    assert job.counts["succeeded"] >= 1 and job.counts["cancelled"] >= 2
    assert {r["custom_id"] for r in client.batch_results(job.id)} == {x["custom_id"] for x in rows}


def test_an_item_lost_between_hand_out_and_submit_is_submitted_again(server, client,
                                                                     monkeypatch):  # fmt: skip
    from unmask.engine.request import GenerationRequest
    from unmask.models.sampler_params import SamplerParams
    from unmask.service import batches

    monkeypatch.setattr(batches, "RECOVER_AFTER_S", 0.5)
    store = server.server.store
    request = GenerationRequest("text", prompt="lost", model=MODEL, params=SamplerParams(**SMALL))
    record = {"id": batches.new_batch_id(), "model": MODEL, "created_at": time.time(),
              "idempotency_key": ""}  # fmt: skip

    async def die_after_taking() -> None:  # what a front end killed mid-hand-out leaves behind
        async with store.lease(record["id"]):
            await store.create(record, [{"custom_id": "lost", "request": request.to_dict()}])
            assert len(await store.take(record["id"], 1)) == 1

    server.call(die_after_taking())
    job = client.wait_batch(record["id"], timeout=30)
    assert job.status == "completed" and job.counts["succeeded"] == 1


def test_a_broker_that_is_down_is_unavailable(tmp_path):
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0", model_name=MODEL)
    with ServerThread(settings) as srv, Client(f"127.0.0.1:{srv.port}", timeout=10) as c:
        assert c.health() == "NOT_SERVING"
        for call in (lambda: c.generate("x", **SMALL),
                     lambda: c.submit_batch([{"custom_id": "a", "body": {"prompt": "x"}}]),
                     lambda: c.get_batch("batch_x")):  # fmt: skip
            with pytest.raises(ServiceError) as err:
                call()
            assert err.value.code == "UNAVAILABLE"


def test_unmask_serve_with_a_broker_starts_fast_without_torch(settings, workers):
    port = free_port()
    env = {**os.environ, "UNMASK_BROKER_URL": settings.broker_url}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "unmask", "serve", "--port", str(port), "--model-name", MODEL],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                return True
            except OSError:
                return False

        wait_until(listening, 20, "unmask serve to listen", every=0.01)
        started = time.monotonic() - t0
        maps = open(f"/proc/{proc.pid}/maps").read() if os.path.exists("/proc") else ""
        assert "libtorch" not in maps
        with Client(f"127.0.0.1:{port}") as c:
            c.wait_ready(timeout=15)  # Redis and the module's worker are there
        assert started < 3.0  # ~0.4 s on this machine, interpreter start included
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    assert b"request_id=" in out


def test_health_follows_the_workers(client, workers, settings):
    from unmask.cli import main

    worker_check = ["health", "--worker", "--broker", settings.broker_url, "--model-name", MODEL]
    assert client.health() == "SERVING" and main(worker_check) == 0
    workers.all[-1].stop()  # warm shutdown: its heartbeat goes away
    wait_until(lambda: client.health() == "NOT_SERVING", 15, "NOT_SERVING", every=0.1)
    assert client.health("unmask.v1.Unmask") == "NOT_SERVING"
    assert main(worker_check) == 1
    workers.start()
    wait_until(lambda: client.health() == "SERVING", 15, "SERVING again", every=0.1)
    assert client.generate("back", **SMALL).text.startswith("back")
