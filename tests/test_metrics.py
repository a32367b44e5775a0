"""Prometheus metrics, scraped over HTTP from real processes after real requests.

- the embedded front end: a real gRPC server (`ServerThread`, tiny model) with a metrics port,
  called with `unmask.client.Client`;
- a worker: a real redis-server and a real `unmask worker` process with a metrics port, fed
  through `JobQueue`.

prometheus_client's default registry is process-wide (other tests' servers count in it too), so
the front-end checks compare the values before and after the calls.
"""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis_fixtures import WorkerProcess, free_port, redis_server, worker_env  # noqa: F401

from unmask.client import Client, ServiceError
from unmask.engine.request import GenerationRequest
from unmask.models.sampler_params import SamplerParams
from unmask.service.server import ServerThread
from unmask.settings import Settings
from unmask.v1 import unmask_pb2 as pb
from unmask.workers.client import JobQueue

SERVICE = "unmask.v1.Unmask"
FAST = {"gen_length": 8, "steps": 2}


class Scrape:
    """One scrape of /metrics: sample values by name and labels."""

    def __init__(self, port: int) -> None:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples


def settled(port: int, timeout: float = 10.0) -> Scrape:
    """A scrape once no call is in flight: a client can see a call's status a moment before
    the server's interceptor has counted it."""
    deadline = time.monotonic() + timeout
    while True:
        scrape = Scrape(port)
        busy = sum(v for (name, _), v in scrape.samples.items() if name == "unmask_rpc_in_flight")
        if busy == 0 or time.monotonic() > deadline:
            return scrape
        time.sleep(0.05)


# ---- the embedded front end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from unmask.models.generation import Generator

    settings = Settings(metrics_port=free_port())
    with ServerThread(settings, generator=Generator.load(tiny_model_dir)) as srv:
        yield srv


def _rpc(method: str, code: str) -> dict[str, str]:
    return {"service": SERVICE, "method": method, "code": code}


def test_front_end_counts_calls_by_method_and_code_and_the_engine_work(server):
    port = server.settings.metrics_port
    engine = server.server.dispatcher._engine
    before = Scrape(port)
    forwards_before = engine.forward_passes
    steps = 0
    with Client(f"127.0.0.1:{server.port}") as client:
        for seed in (1, 2):
            steps += client.generate("Once upon a time", seed=seed, **FAST).usage["steps"]
        events = list(client.stream("The river", seed=3, **FAST))
        assert events[-1]["type"] == "final"
        steps += events[-1]["generation"].usage["steps"]
        with pytest.raises(ServiceError) as err:  # refused before it reaches the Engine
            client.run(pb.GenerateRequest(prompt="x", params=pb.SamplerParams(top_p=2.0)))
        assert err.value.code == "INVALID_ARGUMENT"
    after = settled(port)

    def delta(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    # per call: method and status code, latency, in flight
    assert delta("unmask_rpc_requests_total", **_rpc("Generate", "OK")) == 2
    assert delta("unmask_rpc_requests_total", **_rpc("Generate", "INVALID_ARGUMENT")) == 1
    assert delta("unmask_rpc_requests_total", **_rpc("GenerateStream", "OK")) == 1
    generate = {"service": SERVICE, "method": "Generate"}
    assert delta("unmask_rpc_duration_seconds_count", **generate) == 3
    assert delta("unmask_rpc_duration_seconds_sum", **generate) > 0
    assert after("unmask_rpc_in_flight", **generate) == 0
    # the model's queue, read from the dispatcher when scraped
    assert after("unmask_queue_depth", model="default") == 0
    assert after("unmask_model_ready", model="default") == 1
    assert after("unmask_live_workers", model="default") == 1
    # the embedded Engine: three jobs, their steps, the forwards that ran them
    assert delta("unmask_engine_job_latency_seconds_count", status="succeeded") == 3
    assert delta("unmask_engine_job_steps_total") == steps
    assert delta("unmask_engine_tokens_per_step_count") == steps
    assert delta("unmask_engine_tokens_committed_total") >= 3  # at least one token per job
    forwards = engine.forward_passes - forwards_before
    assert delta("unmask_engine_batch_size_count") == forwards
    assert delta("unmask_engine_batch_size_sum") == steps  # each job-step is one batch row
    assert delta("unmask_engine_forward_seconds_count") == forwards


def test_a_metrics_port_in_use_is_one_clear_error(server):
    from unmask.errors import InvalidArgument

    taken = Settings(metrics_port=server.settings.metrics_port)
    srv = ServerThread(taken, generator=server.server.dispatcher._generator)
    with pytest.raises(InvalidArgument, match="in use") as err:
        srv.start()
    assert err.value.field == "metrics_port"


def test_metrics_are_off_by_default():
    assert Settings().metrics_port == 0
    assert Settings.from_env({"UNMASK_METRICS_PORT": "9100"}).metrics_port == 9100


# ---- a worker -------------------------------------------------------------------------------

MODEL = "metrics"


def test_worker_exports_engine_and_job_metrics(redis_server, tiny_model_dir, tmp_path):  # noqa: F811
    metrics_port = free_port()
    env = worker_env(redis_server.url, tiny_model_dir, model_name=MODEL, heartbeat_s=0.5,
                     metrics_port=metrics_port)  # fmt: skip
    worker = WorkerProcess(env, tmp_path / "worker.log", ("--concurrency", "4")).start()
    settings = Settings(broker_url=redis_server.url, model_name=MODEL, result_ttl_s=600)
    try:
        with JobQueue(settings) as jobs:
            worker.wait_ready(lambda: jobs.live_workers(MODEL))
            before = Scrape(metrics_port)
            assert before("unmask_worker_model_load_seconds") > 0
            assert before("unmask_worker_device_memory_bytes", device="cpu") > 0
            requests = [
                GenerationRequest("text", model=MODEL, prompt=p,
                                  params=SamplerParams(gen_length=8, steps=4, seed=i))
                for i, p in enumerate(("Once upon a time", "The river", "def f(x):\n"))
            ]  # fmt: skip
            ids = [jobs.submit(r) for r in requests]
            results = [jobs.result(job_id, timeout=60) for job_id in ids]
        assert [r.status for r in results] == ["succeeded"] * 3, [r.error for r in results]
        steps = sum(r.usage["steps"] for r in results)
        after = Scrape(metrics_port)
    except BaseException:
        print(worker.tail())
        raise
    finally:
        worker.stop()

    def delta(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    assert delta("unmask_engine_job_latency_seconds_count", status="succeeded") == 3
    assert delta("unmask_engine_job_latency_seconds_sum", status="succeeded") > 0
    assert delta("unmask_engine_job_steps_total") == steps
    assert delta("unmask_engine_tokens_per_step_count") == steps
    assert delta("unmask_engine_tokens_committed_total") >= 3
    assert delta("unmask_engine_batch_size_sum") == steps  # each job-step is one batch row
    assert 0 < delta("unmask_engine_batch_size_count") <= steps
    assert after("unmask_worker_engine_load") == 0
    assert after.has("process_resident_memory_bytes")  # prometheus_client's own
