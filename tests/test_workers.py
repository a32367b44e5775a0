"""The Celery worker queue end to end: a real redis-server, real `unmask worker` processes.

One Redis and one worker (threads pool, 16 task threads feeding one Engine) serve the module;
the crash test at the end kills that worker with SIGKILL and starts another one, which requeues
the dead worker's jobs once its heartbeat (0.5 s, expiring after 2 s) is gone. Short time limits
(soft 12 s, hard 15 s, visibility 18 s) keep the last-resort redelivery quick too.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from redis_fixtures import WorkerProcess, free_port, redis_server, wait_until  # noqa: F401

from unmask.engine.request import GenerationRequest
from unmask.models.generation import Generator
from unmask.models.sampler_params import SamplerParams
from unmask.settings import Settings
from unmask.workers import protocol
from unmask.workers.client import JobQueue
from unmask.workers.protocol import BrokerUnavailable, QueueFullError

P = SamplerParams
MODEL = "tiny"
LIMITS = {"task_soft_time_limit_s": 12, "task_time_limit_s": 15, "visibility_timeout_s": 18}


@pytest.fixture(scope="module")
def settings(redis_server):  # noqa: F811
    return Settings(broker_url=redis_server.url, model_name=MODEL, heartbeat_s=0.5,
                    worker_concurrency=16, max_batch=16, result_ttl_s=600, **LIMITS)  # fmt: skip


@pytest.fixture(scope="module")
def jobs(settings):
    with JobQueue(settings) as q:
        yield q


class Fleet:
    """The module's worker processes; `current` serves the `tiny` queue."""

    def __init__(self, settings: Settings, model_dir, logdir, jobs: JobQueue) -> None:
        env = {f"UNMASK_{k.upper()}": str(v) for k, v in LIMITS.items()}
        self.env = {
            **env,
            "UNMASK_BROKER_URL": settings.broker_url,  # the flags below override the rest
            "UNMASK_MODEL": str(model_dir),
            "UNMASK_HEARTBEAT_S": str(settings.heartbeat_s),
            "UNMASK_MAX_BATCH": str(settings.max_batch),
            "UNMASK_RESULT_TTL_S": str(settings.result_ttl_s),
            "UNMASK_DEVICE": "cpu",
            "OMP_NUM_THREADS": "1",  # same kernels as the test process (one_thread)
            "MKL_NUM_THREADS": "1",
        }
        self.logdir = logdir
        self.jobs = jobs
        self.workers: list[WorkerProcess] = []

    def start(self) -> WorkerProcess:
        log = self.logdir / f"worker-{len(self.workers)}.log"
        args = ("--model-name", MODEL, "--concurrency", "16")
        worker = WorkerProcess(self.env, log, args).start()
        self.workers.append(worker)
        worker.wait_ready(lambda: self.jobs.live_workers(MODEL))
        return worker

    @property
    def current(self) -> WorkerProcess:
        return self.workers[-1]

    def stop(self) -> None:
        for w in self.workers:
            w.stop()


@pytest.fixture(scope="module")
def fleet(settings, jobs, tiny_model_dir, tmp_path_factory):
    f = Fleet(settings, tiny_model_dir, tmp_path_factory.mktemp("workers"), jobs)
    f.start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator.load(tiny_model_dir)


def _alone(generator: Generator, req: GenerationRequest) -> str | bytes:
    """What the job gives run directly, or the name of the error it raises."""
    try:
        out = generator.run(generator.prepare(req)).output
    except Exception as exc:
        return type(exc).__name__
    return out


def _req(modality: str = "text", **kw) -> GenerationRequest:
    return GenerationRequest(modality, model=MODEL, **kw)


def _long(**kw) -> GenerationRequest:
    return _req(params=P(gen_length=200, steps=200, stop_at_eos=False), **kw)


# ---- no worker needed -----------------------------------------------------------------------
def test_worker_without_a_broker_exits_with_a_clear_message(monkeypatch, capsys):
    from unmask.cli import main

    monkeypatch.delenv("UNMASK_BROKER_URL", raising=False)
    assert main(["worker"]) != 0
    err = capsys.readouterr().err
    assert "broker" in err and "UNMASK_BROKER_URL" in err
    t0 = time.monotonic()  # a --broker flag that points nowhere: refused at once, clearly
    assert main(["worker", "--broker", f"redis://127.0.0.1:{free_port()}/0"]) != 0
    assert "unreachable" in capsys.readouterr().err and time.monotonic() - t0 < 2.0


def test_the_client_side_is_torch_free():
    code = (
        "import sys\n"
        "from unmask.settings import Settings\n"
        "from unmask.workers.client import JobQueue\n"
        "JobQueue(Settings(broker_url='redis://127.0.0.1:1/0')).app\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_unreachable_redis_is_a_typed_error_within_two_seconds():
    q = JobQueue(Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="unreachable") as err:
        q.submit(_req(prompt="hi"))
    assert time.monotonic() - t0 < 2.0
    assert err.value.field == "broker_url"


def test_a_full_queue_refuses_new_work(settings):
    q = JobQueue(settings.with_overrides(max_queue=3, model_name="idle"))
    accepted = [q.submit(GenerationRequest("text", model="idle")) for _ in range(3)]
    assert len(accepted) == 3 and q.queue_length("idle") == 3
    with pytest.raises(QueueFullError, match="full") as err:
        q.submit(GenerationRequest("text", model="idle"))
    assert err.value.field == "queue" and err.value.value == protocol.queue_name("idle")
    assert q.queue_length("idle") == 3
    q._redis.delete(protocol.queue_name("idle"))
    q.close()


# ---- one worker -----------------------------------------------------------------------------
def test_mixed_concurrent_jobs_match_running_alone(
    fleet, jobs, generator, chorale_midi, one_thread
):
    midi_seed = next(
        (s for s in range(6) if isinstance(_alone(generator, _midi_scratch(s)), bytes)), 0
    )
    requests = [
        _req(prompt="Once upon a time", params=P(gen_length=24, steps=12)),
        _req(prompt="The river", params=P(gen_length=16, steps=16, temperature=1.0, seed=5)),
        _req("code", prompt="def f(x):\n", params=P(gen_length=32, steps=8, block_length=8,
                                                  use_cache="prefix", temperature=0.8, seed=3)),
        _req("code", prompt="import os\n", params=P(gen_length=16, steps=8)),
        _req(kind="infill", template="A [MASK:5] and [MASK:7] end.",
             params=P(gen_length=12, steps=6, threshold=0.5)),
        _req(kind="infill", template="[MASK:4] said [MASK:3].", params=P(gen_length=7, steps=7)),
        _req("code", kind="infill", template="def [MASK:3](a):\n    return [MASK:4]\n",
             params=P(gen_length=7, steps=4)),
        _midi_scratch(midi_seed),
        _req("midi", params=P(gen_length=20, steps=10, use_cache="dual", block_length=10)),
        _req("midi", kind="midi_infill", midi=chorale_midi, bars=(1,), tracks=(0,),
             params=P(gen_length=8, steps=4)),
        _req(params=P(gen_length=40, steps=20, temperature=1.0, top_k=50, top_p=0.9, seed=11)),
        _req(prompt="Hello", params=P(gen_length=8, steps=4)),
    ]  # fmt: skip
    expected = {r.job_id: _alone(generator, r) for r in requests}
    ids = [jobs.submit(r) for r in requests]
    for job_id in ids:
        res = jobs.result(job_id, timeout=60)
        want = expected[job_id]
        if isinstance(want, str) and res.status == protocol.FAILED:
            assert res.error["type"] == want, res.error
            continue
        assert res.status == protocol.SUCCEEDED, res.error
        got = res.output_midi if isinstance(want, bytes) else res.output_text
        assert got == want
        assert jobs.completions(job_id) == 1
    assert any(isinstance(expected[i], bytes) for i in ids)  # the midi_infill at least decodes


def _midi_scratch(seed: int) -> GenerationRequest:
    return _req("midi", params=P(gen_length=24, steps=12, temperature=1.0, seed=seed))


def test_events_hold_accepted_steps_final_and_resume_by_id(fleet, jobs):
    job_id = jobs.submit(_req(prompt="Hi", params=P(gen_length=16, steps=8, block_length=8,
                                                   stop_at_eos=False)))  # fmt: skip
    events = list(jobs.events(job_id, block_ms=500, timeout=60))
    kinds = [e["type"] for _, e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "final"
    assert kinds.count("step") == 8 and kinds.count("block") == 2
    assert events[-1][1]["status"] == protocol.SUCCEEDED
    middle = events[4][0]
    resumed = list(jobs.events(job_id, last_id=middle, block_ms=200, timeout=10))
    assert resumed == events[5:]
    assert list(jobs.events(job_id, last_id=events[-1][0], block_ms=100, timeout=5)) == []
    res = jobs.result(job_id, timeout=5)
    assert res.output_text == events[-1][1]["output_text"]
    assert jobs.status(job_id)["status"] == protocol.SUCCEEDED


def test_concurrent_jobs_each_get_their_own_events_in_order(fleet, jobs):
    # one relay thread sends every job's events, many jobs' in one pipeline: each stream must
    # still hold its own job's events only, in step order, with the final one last
    lengths = [8, 12, 16, 8, 12, 16]
    ids = [jobs.submit(_req(prompt=f"Hi {i}", params=P(gen_length=n, steps=n, block_length=4,
                                                         stop_at_eos=False, seed=i)))
           for i, n in enumerate(lengths)]  # fmt: skip
    for job_id, n in zip(ids, lengths, strict=True):
        events = [e for _, e in jobs.events(job_id, block_ms=500, timeout=60)]
        assert events[0] == {"type": "accepted", "job_id": job_id}
        assert events[-1]["type"] == "final" and events[-1]["job_id"] == job_id
        steps = [e["step"] for e in events if e["type"] == "step"]
        assert steps == list(range(n))
        assert [e["index"] for e in events if e["type"] == "block"] == list(range(n // 4))


def test_a_finished_job_delivered_again_does_not_run_again(fleet, jobs):
    req = _req(prompt="Again", params=P(gen_length=8, steps=4))
    job_id = jobs.submit(req)
    first = jobs.result(job_id, timeout=30)
    assert jobs.status(job_id)["deliveries"] == 1
    jobs.submit(req)  # the same job id again: a resubmission, as a redelivery would be
    wait_until(lambda: jobs.status(job_id)["deliveries"] == 2, 30, "the second delivery")
    time.sleep(0.3)  # had it run again, a step would have been taken by now
    assert jobs.status(job_id)["runs"] == 1
    assert jobs.completions(job_id) == 1
    assert jobs.result(job_id, timeout=1) == first
    finals = [e for _, e in jobs.events(job_id, timeout=5) if e["type"] == "final"]
    assert len(finals) == 1


def test_cancel_a_running_job_and_a_deadline(fleet, jobs):
    running = jobs.submit(_long())
    late = jobs.submit(_long(deadline=time.time() + 0.3))
    next(e for _, e in jobs.events(running, timeout=30) if e["type"] == "step")
    assert jobs.status(running)["status"] == protocol.RUNNING
    assert jobs.cancel(running) is True
    res = jobs.result(running, timeout=15)
    assert res.status == protocol.CANCELLED
    assert res.usage["steps"] < 200
    assert jobs.result(late, timeout=15).status == protocol.DEADLINE
    assert jobs.cancel(running) is False  # finished already
    assert jobs.completions(running) == 1 and jobs.completions(late) == 1


# ---- a crash --------------------------------------------------------------------------------
def test_kill_9_mid_jobs_then_a_new_worker_completes_each_exactly_once(fleet, jobs):
    reqs = [_req(params=P(gen_length=64, steps=64, stop_at_eos=False, seed=i)) for i in range(4)]
    ids = [jobs.submit(r) for r in reqs]
    r = jobs._redis
    wait_until(
        lambda: any(r.xlen(protocol.events_key(j)) >= 4 for j in ids), 30, "a job to be stepping"
    )
    killed = fleet.current
    killed.kill9()
    unfinished = [j for j in ids if not r.exists(protocol.result_key(j))]
    assert unfinished, "every job finished before the kill: make the jobs longer"
    runs_before = {j: jobs.status(j)["runs"] for j in ids}
    # queued while no worker is alive, cancelled before any worker sees it
    queued = jobs.submit(_req(prompt="never", params=P(gen_length=8, steps=4)))
    assert jobs.cancel(queued) is True
    assert jobs.status(queued)["status"] == protocol.QUEUED

    fleet.start()  # picks up the queued job now, the crashed ones once it sees the kill
    for job_id in ids:
        res = jobs.result(job_id, timeout=60)
        assert res.status == protocol.SUCCEEDED, res.error
        assert len(res.output_text) > 0
        assert jobs.completions(job_id) == 1  # exactly once, nothing lost
    for j in ids:  # the interrupted ones really ran again, the finished ones did not
        assert jobs.status(j)["runs"] == runs_before[j] + (j in unfinished)

    res = jobs.result(queued, timeout=10)
    assert res.status == protocol.CANCELLED
    assert jobs.status(queued)["runs"] == 0  # stored without running
    assert [e["type"] for _, e in jobs.events(queued, timeout=5)] == ["final"]
    assert jobs.completions(queued) == 1
    live = {w["pid"] for w in jobs.live_workers(MODEL)}
    assert fleet.current.pid in live and killed.pid not in live
