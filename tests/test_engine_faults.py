"""One bad job never takes the Engine down: faults injected in admission, the batched step and
retirement fail only their job (INTERNAL, traceback logged); a dead loop thread is restarted by
the watchdog, and gRPC health says NOT_SERVING until it is.

Faults are injected by subclassing / patching one Engine method so that it raises for jobs whose
prompt starts with POISON; the model is the tiny random one and runs for real.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from unmask.client import Client, ServiceError
from unmask.engine.engine import FAILED, SUCCEEDED, Engine, JobHandle
from unmask.engine.request import GenerationRequest
from unmask.errors import error_from_dict
from unmask.models.generation import Generator
from unmask.models.sampler_params import SamplerParams
from unmask.service.server import ServerThread
from unmask.settings import Settings

pytestmark = pytest.mark.usefixtures("one_thread")

POISON = "POISON"


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator.load(tiny_model_dir)


@pytest.fixture
def engine_log(caplog):
    """The Engine's log records, even if logging was configured not to propagate."""
    logger = logging.getLogger("unmask.engine")
    before = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(before)


def _request(prompt: str = "Once upon a time", n: int = 16) -> GenerationRequest:
    return GenerationRequest("text", prompt=prompt, params=SamplerParams(gen_length=n, steps=n))


def _poisoned(request: GenerationRequest) -> bool:
    return request.prompt.startswith(POISON)


def _check(stage: str, fail_in: str, request: GenerationRequest) -> None:
    if stage == fail_in and _poisoned(request):
        raise RuntimeError(f"injected fault in {stage}")


class FaultyEngine(Engine):
    """An Engine whose admission, forward pass or retirement raises for POISON jobs."""

    def __init__(self, generator: Generator, *, fail_in: str, **kwargs) -> None:
        super().__init__(generator, **kwargs)
        self.fail_in = fail_in

    def _prepare(self, handle, should_cancel):
        _check("admit", self.fail_in, handle.request)
        return super()._prepare(handle, should_cancel)

    def _forward(self, ready):
        for a, _ in ready:  # like a kernel that faults on one row: the whole batch fails
            _check("step", self.fail_in, a.handle.request)
        return super()._forward(ready)

    def _succeed(self, a, gen):
        _check("retire", self.fail_in, a.handle.request)
        super()._succeed(a, gen)


def _alone(generator: Generator, request: GenerationRequest) -> str:
    return generator.run(generator.prepare(request)).output


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


def _tracebacks(caplog, job_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if job_id in r.getMessage() and r.exc_info]


@pytest.mark.parametrize("stage", ["admit", "step", "retire"])
def test_a_job_that_raises_fails_alone_with_internal_and_a_traceback(generator, engine_log, stage):
    good = [_request("Once upon a time"), _request("The cat", n=8)]
    bad = _request(POISON + " pill")
    engine = FaultyEngine(generator, fail_in=stage)
    # queued before the loop starts: the poisoned job shares its first batch with the others
    handles = [engine.submit(r) for r in (good[0], bad, good[1])]
    with engine.start():
        results = [h.result(timeout=60) for h in handles]
        assert engine.healthy and engine.restarts == 0
    poisoned = results[1]
    assert poisoned.status == FAILED and poisoned.error["type"] == "RuntimeError"
    assert poisoned.error["message"] == f"injected fault in {stage}"
    assert error_from_dict(poisoned.error).code == "INTERNAL"
    assert _tracebacks(engine_log, bad.job_id)
    for r, res in zip(good, (results[0], results[2]), strict=True):
        assert res.status == SUCCEEDED, res.error
        assert res.output_text == _alone(generator, r)  # the isolation changed no token
    if stage == "step":  # the batched forward failed and each job was rerun alone
        assert any("running each alone" in r.getMessage() for r in engine_log.records)


def test_a_cancel_check_that_raises_fails_only_its_job(generator, engine_log):
    def redis_down() -> bool:
        raise ConnectionError("Redis went away")

    with Engine(generator) as engine:
        bad = engine.submit(_request(n=8), should_cancel=redis_down)
        good = engine.submit(_request(n=8))
        rb, rg = bad.result(timeout=60), good.result(timeout=60)
    assert rb.status == FAILED and rb.error["type"] == "ConnectionError"
    assert error_from_dict(rb.error).code == "INTERNAL"
    assert rg.status == SUCCEEDED
    assert _tracebacks(engine_log, bad.job_id)


def test_a_dead_loop_thread_is_restarted_and_its_active_jobs_finish(generator, engine_log):
    turns = {"n": 0}

    class CrashOnce(Engine):
        def _retire_interrupted(self):  # a bug in the loop itself, outside any job
            turns["n"] += 1
            if turns["n"] == 3:
                raise RuntimeError("injected: the loop's own code failed")
            super()._retire_interrupted()

    request = _request(n=16)
    with CrashOnce(generator, restart_delay_s=0.01) as engine:
        result = engine.submit(request).result(timeout=60)
        assert engine.restarts == 1 and engine.healthy
    assert result.status == SUCCEEDED
    assert result.output_text == _alone(generator, request)  # its state survived the restart
    assert any("engine thread died" in r.getMessage() and r.exc_info for r in engine_log.records)


def test_the_engine_is_unhealthy_until_the_watchdog_restarts_the_loop(generator):
    broken = threading.Event()
    broken.set()

    class BrokenAdmission(Engine):
        def _admit_queued(self):
            if broken.is_set():
                raise RuntimeError("injected: admission is broken")
            super()._admit_queued()

    with BrokenAdmission(generator, restart_delay_s=0.05) as engine:
        assert engine.healthy
        handles = [engine.submit(_request(n=8)) for _ in range(3)]
        _wait_for(lambda: not engine.healthy)
        assert not any(h.done() for h in handles)  # queued, not lost
        broken.clear()
        assert all(h.result(timeout=60).status == SUCCEEDED for h in handles)
        assert engine.healthy and engine.restarts >= 1


def test_a_job_that_keeps_killing_the_loop_is_failed_and_the_queue_goes_on(generator):
    class PoisonKillsLoop(Engine):
        def _retire_interrupted(self):  # a path no per-job guard covers
            if any(_poisoned(a.handle.request) for a in self._active):
                raise RuntimeError("injected: the loop dies with this job")
            super()._retire_interrupted()

    with PoisonKillsLoop(generator, max_batch=1, restart_delay_s=0.01) as engine:
        bad = engine.submit(_request(POISON))
        good = engine.submit(_request(n=8))
        rb, rg = bad.result(timeout=60), good.result(timeout=60)
        assert engine.restarts == 3
    assert rb.status == FAILED and rb.error["type"] == "EngineCrashed"
    assert error_from_dict(rb.error).code == "INTERNAL"
    assert rg.status == SUCCEEDED


def test_closing_while_the_loop_is_dead_ends_every_job(generator):
    class NeverAdmits(Engine):
        def _admit_queued(self):
            raise RuntimeError("injected: admission is broken")

    engine = NeverAdmits(generator, restart_delay_s=0.05).start()
    handles: list[JobHandle] = [engine.submit(_request(n=8)) for _ in range(2)]
    _wait_for(lambda: not engine.healthy)
    engine.close()
    assert [h.result(timeout=5).status for h in handles] == ["cancelled"] * 2


# ---- through the real gRPC front end -------------------------------------------------------


@pytest.fixture(scope="module")
def server(generator):
    with ServerThread(Settings(), generator=generator, health_interval_s=0.02) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


def test_a_poisoned_job_fails_internal_while_a_concurrent_job_completes(
    client, monkeypatch, engine_log
):
    forward = Engine._forward

    def poisoned_forward(self, ready):
        if any(_poisoned(a.handle.request) for a, _ in ready):
            raise RuntimeError("injected: the forward pass faulted")
        return forward(self, ready)

    monkeypatch.setattr(Engine, "_forward", poisoned_forward)
    assert client.health() == "SERVING"
    events = client.stream("Once upon a time", gen_length=64, steps=64)
    assert next(events)["type"] == "accepted"
    assert next(e for e in events if e["type"] == "step")  # the good job is running
    with pytest.raises(ServiceError) as err:
        client.generate(POISON + " pill", gen_length=8, steps=8)  # batched with the good job
    assert err.value.code == "INTERNAL" and "injected" in err.value.message
    final = [e for e in events if e["type"] == "final"]
    assert final and final[0]["generation"].usage["generated_tokens"] == 64
    assert any("running each alone" in r.getMessage() for r in engine_log.records)
    assert client.health() == "SERVING"


def test_health_is_not_serving_while_the_engine_restarts(client, monkeypatch):
    broken = threading.Event()
    broken.set()
    admit = Engine._admit_queued

    def broken_admission(self):
        if broken.is_set():
            raise RuntimeError("injected: admission is broken")
        admit(self)

    monkeypatch.setattr(Engine, "_admit_queued", broken_admission)
    result: dict[str, object] = {}
    caller = threading.Thread(
        target=lambda: result.update(g=client.generate("Hi", gen_length=8, steps=4, timeout=60))
    )
    caller.start()  # its job kills the loop on admission, again and again
    _wait_for(lambda: client.health() == "NOT_SERVING")
    assert caller.is_alive()  # the call waits: its job is still queued
    broken.clear()
    caller.join(60)
    assert result["g"].usage["generated_tokens"] == 8  # type: ignore[attr-defined]
    _wait_for(lambda: client.health() == "SERVING")
