"""The Engine: step-level continuous batching gives the same tokens as running alone."""

from __future__ import annotations

import time

import pytest

from unmask.engine.engine import CANCELLED, DEADLINE, FAILED, SUCCEEDED, Engine, QueueFull
from unmask.engine.request import GenerationRequest
from unmask.errors import InvalidArgument
from unmask.models.generation import Generator
from unmask.models.sampler_params import SamplerParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator.load(tiny_model_dir)


def _requests(chorale_midi: bytes) -> list[GenerationRequest]:
    P = SamplerParams
    return [
        GenerationRequest("text", prompt="Once upon a time", params=P(gen_length=24, steps=12)),
        GenerationRequest(
            "code",
            prompt="def f(x):\n",
            params=P(
                gen_length=32, steps=8, block_length=8, use_cache="prefix", temperature=0.8, seed=3
            ),
        ),  # fmt: skip
        GenerationRequest(
            "text",
            kind="infill",
            template="A [MASK:5] and [MASK:7] end.",
            params=P(gen_length=12, steps=6, threshold=0.5),
        ),  # fmt: skip
        GenerationRequest(
            "midi",
            params=P(
                gen_length=20,
                steps=10,
                use_cache="dual",
                block_length=10,
                remask_budget=2,
                remask_threshold=0.5,
            ),
        ),  # fmt: skip
        GenerationRequest(
            "midi",
            kind="midi_infill",
            midi=chorale_midi,
            bars=(1,),
            tracks=(0,),
            params=P(gen_length=8, steps=4),
        ),  # fmt: skip
        GenerationRequest(
            "text",
            prompt="",
            params=P(gen_length=40, steps=40, temperature=1.0, top_k=50, top_p=0.9, seed=11),
        ),  # fmt: skip
    ]


def _alone(generator: Generator, req: GenerationRequest):
    gen = generator.run(generator.prepare(req))
    return gen.ids, gen.output


def test_batched_jobs_give_the_same_tokens_as_running_alone(generator, chorale_midi):
    requests = _requests(chorale_midi)
    expected = {}
    for r in requests:
        try:
            expected[r.job_id] = _alone(generator, r)
        except Exception as exc:  # e.g. a random model's undecodable MIDI: same error expected
            expected[r.job_id] = type(exc).__name__
    with Engine(generator, max_batch=16) as engine:
        handles = [engine.submit(r) for r in requests]
        results = {h.job_id: h.result(timeout=120) for h in handles}
        assert engine.forward_passes < sum(r.params.steps for r in requests)
    for r in requests:
        res = results[r.job_id]
        if isinstance(expected[r.job_id], str):
            assert res.status == FAILED and res.error["type"] == expected[r.job_id]
            continue
        assert res.status == SUCCEEDED, res.error
        output = res.output_midi or res.output_text
        assert output == expected[r.job_id][1]


def test_jobs_joining_mid_run_still_match(generator, chorale_midi):
    requests = _requests(chorale_midi)[:3]
    expected = {r.job_id: _alone(generator, r)[1] for r in requests}
    with Engine(generator, max_batch=4) as engine:
        first = engine.submit(requests[0])
        time.sleep(0.05)
        later = [engine.submit(r) for r in requests[1:]]
        for h in [first, *later]:
            res = h.result(timeout=60)
            assert res.status == SUCCEEDED and res.output_text == expected[h.job_id]


def test_events_arrive_in_order_and_commit_everything(generator):
    req = GenerationRequest(
        "text", prompt="Hi", params=SamplerParams(gen_length=16, steps=8, block_length=8,
                                                  stop_at_eos=False))  # fmt: skip
    with Engine(generator) as engine:
        events = list(engine.submit(req).events(timeout=60))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "final"
    assert kinds.count("block") == 2 and kinds.count("step") == 8
    committed = sum(len(e["committed"]) for e in events if e["type"] == "step")
    assert committed == 16
    assert events[-1]["result"].status == SUCCEEDED


def test_a_job_nobody_watches_sends_no_progress_and_the_same_result(generator):
    params = SamplerParams(gen_length=16, steps=8, block_length=8, stop_at_eos=False, seed=4)
    watched = GenerationRequest("text", prompt="Hi", params=params, return_tokens=True)
    quiet = GenerationRequest("text", prompt="Hi", params=params, return_tokens=True,
                              progress=False)  # fmt: skip
    with Engine(generator) as engine:
        a = list(engine.submit(watched).events(timeout=60))
        b = list(engine.submit(quiet).events(timeout=60))
    assert [e["type"] for e in b] == ["accepted", "final"]
    ra, rb = a[-1]["result"], b[-1]["result"]
    assert rb.status == SUCCEEDED and rb.output_text == ra.output_text
    assert rb.tokens == ra.tokens and len(rb.tokens) == 16  # return_tokens does not need events
    with pytest.raises(InvalidArgument) as err:
        GenerationRequest("text", prompt="Hi", progress="no")
    assert err.value.field == "progress"
    assert GenerationRequest.from_dict(quiet.to_dict()).progress is False


def test_cancel_ends_a_running_job(generator):
    req = GenerationRequest("text", params=SamplerParams(gen_length=200, steps=200))
    with Engine(generator) as engine:
        handle = engine.submit(req)
        next(e for e in handle.events(timeout=30) if e["type"] == "step")
        handle.cancel()
        assert handle.result(timeout=30).status == CANCELLED


def test_external_cancel_flag_is_checked_between_steps(generator):
    # The flag flips on its 4th poll: polled between steps, so the job has run 1 to 3 steps by
    # then. Deterministic: no race with a reader thread, and the job cannot have finished
    # (200 steps, no early stop at EOS).
    polls = []

    def should_cancel() -> bool:
        polls.append(time.monotonic())
        return len(polls) > 3

    req = GenerationRequest("text", params=SamplerParams(gen_length=200, steps=200,
                                                         stop_at_eos=False))  # fmt: skip
    with Engine(generator) as engine:
        handle = engine.submit(req, should_cancel=should_cancel)
        res = handle.result(timeout=30)
        events = list(handle.events(timeout=5))
    steps = [e for e in events if e["type"] == "step"]
    assert res.status == CANCELLED and res.error["type"] == "Cancelled"
    assert 1 <= len(steps) < 200, f"cancelled after {len(steps)} steps"
    assert len(steps) <= 3 and res.usage["steps"] == len(steps)  # not a step past the flag
    assert len(polls) == 4  # and no poll after it


def test_a_job_past_its_deadline_ends_with_deadline_status(generator):
    req = GenerationRequest(
        "text", params=SamplerParams(gen_length=200, steps=200), deadline=time.time() + 0.05
    )
    with Engine(generator) as engine:
        res = engine.submit(req).result(timeout=30)
    assert res.status == DEADLINE


def test_a_bad_job_fails_alone_with_the_field_named(generator):
    bad = GenerationRequest("text", params=SamplerParams(gen_length=300, steps=10))
    good = GenerationRequest("text", params=SamplerParams(gen_length=8, steps=4))
    with Engine(generator) as engine:
        hb, hg = engine.submit(bad), engine.submit(good)
        rb, rg = hb.result(timeout=30), hg.result(timeout=30)
    assert rb.status == FAILED and rb.error["field"] == "gen_length"
    assert rg.status == SUCCEEDED


def test_full_queue_refuses_new_jobs(generator):
    engine = Engine(generator, max_queue=2)  # not started: nothing drains the queue
    req = lambda: GenerationRequest("text", params=SamplerParams(gen_length=8, steps=4))  # noqa: E731
    engine.submit(req())
    engine.submit(req())
    with pytest.raises(QueueFull, match="full"):
        engine.submit(req())


def test_ar_model_jobs_run_through_the_engine(tiny_ar_dir):
    gen = Generator.load(tiny_ar_dir)
    req = GenerationRequest("text", prompt="Hello", params=SamplerParams(gen_length=10, steps=5))
    with Engine(gen) as engine:
        res = engine.submit(req).result(timeout=60)
    assert res.status == SUCCEEDED and res.output_text.startswith("Hello")


def test_request_round_trips_through_json_and_validates(chorale_midi):
    req = GenerationRequest("midi", kind="midi_infill", midi=chorale_midi, bars=(0, 2))
    again = GenerationRequest.from_dict(req.to_dict())
    assert again == req
    with pytest.raises(InvalidArgument) as err:
        GenerationRequest.from_dict({**req.to_dict(), "modality": "video"})
    assert err.value.field == "modality"
    with pytest.raises(InvalidArgument) as err:
        GenerationRequest.from_dict({**req.to_dict(), "midi_b64": "@@@"})
    assert err.value.field == "midi_b64"
    with pytest.raises(InvalidArgument) as err:
        GenerationRequest.from_dict({**req.to_dict(), "params": {"steps": -1}})
    assert err.value.field == "steps"


class _Recorder:
    """An EngineObserver that keeps what it is told; `broken` makes every call raise."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.forwards: list[int] = []
        self.committed: list[int] = []
        self.ended: list[str] = []

    def forward(self, batch_size: int, seconds: float) -> None:
        assert seconds >= 0 and not self.broken, "observer broken"
        self.forwards.append(batch_size)

    def job_step(self, committed: int) -> None:
        assert not self.broken, "observer broken"
        self.committed.append(committed)

    def job_ended(self, status: str, seconds: float) -> None:
        assert seconds >= 0 and not self.broken, "observer broken"
        self.ended.append(status)


def test_the_observer_hears_every_forward_step_and_end(generator):
    P = SamplerParams
    requests = [GenerationRequest("text", prompt="Hi", params=P(gen_length=8, steps=s))
                for s in (2, 4, 8)]  # fmt: skip
    seen = _Recorder()
    with Engine(generator, max_batch=8, observer=seen) as engine:
        results = [h.result(timeout=60) for h in [engine.submit(r) for r in requests]]
        forwards, rows = engine.forward_passes, engine.rows_run
    assert [r.status for r in results] == [SUCCEEDED] * 3
    steps = sum(r.usage["steps"] for r in results)
    assert len(seen.forwards) == forwards and sum(seen.forwards) == rows == steps
    assert max(seen.forwards) > 1  # batched
    assert len(seen.committed) == steps and sum(seen.committed) >= 3 * 8
    assert seen.ended == [SUCCEEDED] * 3


def test_a_failing_observer_never_fails_a_job(generator):
    request = GenerationRequest("text", prompt="Hi", params=SamplerParams(gen_length=8, steps=2))
    with Engine(generator, observer=_Recorder(broken=True)) as engine:
        assert engine.submit(request).result(timeout=60).status == SUCCEEDED
