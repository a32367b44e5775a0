"""The gRPC front end with the local (in-process) dispatcher, over real gRPC on loopback.

One server (tiny random model, small limits) serves the module; auth and TLS get their own
servers sharing the loaded model. Jobs are kept tiny: the machine's CPUs are busy.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import sys
import time

import grpc
import mido
import pytest

from unmask.client import AsyncClient, Client, ServiceError
from unmask.service.server import ServerThread
from unmask.settings import Settings
from unmask.v1 import unmask_pb2 as pb
from unmask.v1 import unmask_pb2_grpc as pb_grpc

SMALL = {"gen_length": 8, "steps": 2}
LIMITS = {"max_message_bytes": 1 << 20, "max_batch_items": 6, "batch_window": 2}


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from unmask.models.generation import Generator

    return Generator.load(tiny_model_dir)


@pytest.fixture(scope="module")
def server(generator):
    with ServerThread(Settings(**LIMITS), generator=generator) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", max_message_bytes=4 << 20) as c:
        yield c


def _notes(midi: bytes) -> int:
    mf = mido.MidiFile(file=io.BytesIO(midi))
    return sum(1 for t in mf.tracks for m in t if m.type == "note_on" and m.velocity > 0)


# ---- generation ----------------------------------------------------------------------------


def test_text_and_code_generation_return_output_and_usage(client):
    text = client.generate("Once upon a time", seed=1, **SMALL)
    code = client.generate("def add(a, b):\n", modality="code", seed=1, **SMALL)
    assert text.text.startswith("Once upon a time") and len(text.text) > len("Once upon a time")
    assert code.text.startswith("def add(a, b):\n") and code.modality == "code"
    for g in (text, code):
        assert g.usage["generated_tokens"] == 8 and g.usage["nfe"] == 2
        assert g.usage["prompt_tokens"] > 0 and g.usage["finish_reason"]
        assert g.usage["tokens_per_forward"] == 4.0 and g.job_id


def test_unset_params_take_defaults_that_fit_the_length(client):
    assert client.generate("a", gen_length=8).usage["steps"] == 8
    assert client.generate("a", gen_length=8, block_length=4).usage["generated_tokens"] == 8


def test_client_side_message_limit(server):
    with Client(f"127.0.0.1:{server.port}", max_message_bytes=64) as tiny:
        with pytest.raises(ServiceError) as err:
            tiny.generate("a", **SMALL)  # the answer is larger than 64 bytes
        assert err.value.code == "RESOURCE_EXHAUSTED"


def test_midi_from_settings_is_a_standard_midi_file_with_notes(client):
    g = client.midi(time_signature="3/4", tempo=100, voices=2, n_bars=2, gen_length=24, steps=4,
                    temperature=1.0, seed=0)  # fmt: skip
    mf = mido.MidiFile(file=io.BytesIO(g.midi))
    assert g.modality == "midi" and _notes(g.midi) > 0
    sigs = [m for t in mf.tracks for m in t if m.type == "time_signature"]
    assert sigs and (sigs[0].numerator, sigs[0].denominator) == (3, 4)


def test_midi_continuation_keeps_the_given_piece_and_adds_notes(client, chorale_midi):
    piece = client.midi(voices=1, n_bars=1, gen_length=16, steps=4, seed=2).midi
    g = client.midi(piece, gen_length=16, steps=4, temperature=1.0, stop_at_eos=False)
    assert _notes(g.midi) > _notes(piece) > 0
    # a piece longer than the model's window is refused with the limit, never cut silently
    with pytest.raises(ServiceError) as err:
        client.midi(chorale_midi, gen_length=8, steps=2)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field == "midi"
    assert "window" in err.value.message


def test_stream_events_arrive_in_order(client):
    events = list(client.stream("The", gen_length=8, steps=4, block_length=4))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "final"
    assert kinds.count("step") == 4 and kinds.count("block") == 2
    steps = [e for e in events if e["type"] == "step"]
    assert [s["step"] for s in steps] == sorted(s["step"] for s in steps)
    committed = [p for s in steps for p, _, c in s["committed"] if 0 <= c <= 1]
    assert len(committed) == len(set(committed)) == 8
    assert [e["index"] for e in events if e["type"] == "block"] == [0, 1]
    assert events[-1]["generation"].job_id == events[0]["job_id"]


def test_infill_keeps_fixed_segments_byte_identical(client):
    head, tail = "def area(r):\n    return ", "\n\nprint(area(2.0))  # ünïcode\t \n"
    g = client.infill([head, 5, tail], modality="code", steps=2)
    assert g.text.startswith(head) and g.text.endswith(tail)
    assert len(g.text) > len(head + tail)
    t = client.infill("Hello [MASK:3] world [MASK:2]!", steps=2)
    assert t.text.startswith("Hello ") and " world " in t.text and t.text.endswith("!")


def test_async_client_generates_and_streams(server):
    async def go():
        async with AsyncClient(f"127.0.0.1:{server.port}") as c:
            g = await c.generate("Hi", **SMALL)
            kinds = [e["type"] async for e in c.stream("Hi", **SMALL)]
            return g, kinds

    g, kinds = asyncio.run(go())
    assert g.usage["generated_tokens"] == 8
    assert kinds[0] == "accepted" and kinds[-1] == "final"


# ---- errors --------------------------------------------------------------------------------

BAD_REQUESTS = [
    (dict(prompt="x", params=pb.SamplerParams(top_p=2.0)), "INVALID_ARGUMENT", "params.top_p"),
    (dict(prompt="x", params=pb.SamplerParams(gen_length=4, steps=9)), "INVALID_ARGUMENT",
     "params.steps"),
    (dict(prompt="x", params=pb.SamplerParams(cache="bogus")), "INVALID_ARGUMENT", "params.cache"),
    (dict(prompt="x", params=pb.SamplerParams(speculative=True, **SMALL)), "INVALID_ARGUMENT",
     "params.speculative"),  # the tiny model attends both ways: found by the Engine
    (dict(prompt="x", params=pb.SamplerParams(gen_length=100_000)), "INVALID_ARGUMENT",
     "params.gen_length"),
    (dict(prompt="x", params=pb.SamplerParams(gen_length=300, steps=2)), "INVALID_ARGUMENT",
     "params.gen_length"),  # longer than the model's window: found by the Engine
    (dict(prompt="x" * 200_001), "INVALID_ARGUMENT", "prompt"),
    (dict(prompt="x", modality=pb.MODALITY_MIDI), "INVALID_ARGUMENT", "modality"),
    (dict(midi=b"MThd-not-really"), "INVALID_ARGUMENT", "midi"),
    (dict(infill=pb.Infill(segments=[pb.Segment(text="no gap")])), "INVALID_ARGUMENT",
     "infill.segments"),
    (dict(infill=pb.Infill(segments=[pb.Segment(text="a [MASK:2]"), pb.Segment(mask=2)])),
     "INVALID_ARGUMENT", "infill.segments[0].text"),
    (dict(midi_settings=pb.MidiSettings(time_signature="7/3")), "INVALID_ARGUMENT",
     "midi_settings.time_signature"),
    (dict(midi_settings=pb.MidiSettings(time_signature="7/4")), "INVALID_ARGUMENT",
     "midi_settings.time_signature"),  # well-formed, not in the vocabulary
    (dict(midi_settings=pb.MidiSettings(programs=[200])), "INVALID_ARGUMENT",
     "midi_settings.programs"),
    (dict(midi_infill=pb.MidiInfill(midi=b"x")), "INVALID_ARGUMENT", "midi_infill.bars"),
    (dict(prompt="x", model="no-such-model"), "NOT_FOUND", "model"),
    (dict(midi=b"\0" * (1 << 20)), "RESOURCE_EXHAUSTED", None),  # over the message limit
]  # fmt: skip


@pytest.mark.parametrize(("fields", "code", "field"), BAD_REQUESTS)
def test_bad_requests_get_their_status_code_and_name_the_field(client, fields, code, field):
    fields.setdefault("params", pb.SamplerParams(**SMALL))
    with pytest.raises(ServiceError) as err:
        client.run(pb.GenerateRequest(**fields))
    assert err.value.code == code, err.value
    if field:
        assert err.value.field == field and err.value.message.startswith(field + ":")


def test_unknown_batch_and_model_are_not_found(client):
    for call in (lambda: client.get_batch("batch_nope"), lambda: client.cancel_batch("nope"),
                 lambda: list(client.batch_results("nope")), lambda: client.get_model("nope")):  # fmt: skip
        with pytest.raises(ServiceError) as err:
            call()
        assert err.value.code == "NOT_FOUND"


def test_client_deadline_becomes_the_jobs_deadline(client, server):
    with pytest.raises(ServiceError) as err:
        client.generate("x", gen_length=128, steps=128, timeout=0.3)
    assert err.value.code == "DEADLINE_EXCEEDED"
    _no_jobs_left(server)


def _no_jobs_left(server, timeout=10.0):
    engine = server.server.dispatcher._engine
    end = time.monotonic() + timeout
    while engine.load and time.monotonic() < end:
        time.sleep(0.05)
    assert engine.load == 0, "the job kept running after its call ended"


def test_a_client_that_cancels_its_stream_cancels_the_job(client, server):
    events = client.stream("x", gen_length=128, steps=128)
    first = next(events)
    assert first["type"] == "accepted"
    events.close()  # cancels the call
    dispatcher = server.server.dispatcher
    end = time.monotonic() + 10
    while server.call(dispatcher.status(first["job_id"])) == "running":
        assert time.monotonic() < end, "the job was not cancelled"
        time.sleep(0.05)
    assert server.call(dispatcher.status(first["job_id"])) == "cancelled"


def test_job_failure_and_cancellation_codes_map_from_the_result():
    from unmask.engine.result import GenerationResult
    from unmask.service.status import JobFailed, to_status

    def code(status: str, error: dict | None) -> grpc.StatusCode:
        return to_status(JobFailed(GenerationResult("j", status, error=error)))[0]

    assert code("cancelled", None) == grpc.StatusCode.CANCELLED
    assert code("deadline_exceeded", None) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert code("failed", None) == grpc.StatusCode.INTERNAL
    assert code("failed", {"code": "RESOURCE_EXHAUSTED", "message": "full"}) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert code("failed", {"code": "NO_SUCH_CODE"}) == grpc.StatusCode.INTERNAL


# ---- metadata, health, reflection ---------------------------------------------------------


def test_request_id_is_echoed_or_assigned(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.UnmaskStub(ch)
        _, call = stub.ListModels.with_call(pb.ListModelsRequest(),
                                            metadata=(("x-request-id", "req-42"),))  # fmt: skip
        assert ("x-request-id", "req-42") in call.initial_metadata()
        _, call = stub.ListModels.with_call(pb.ListModelsRequest())
        assigned = dict(call.initial_metadata())["x-request-id"]
        assert len(assigned) == 32
    with Client(f"127.0.0.1:{server.port}", request_id="req-43") as c:
        with pytest.raises(ServiceError) as err:
            c.get_batch("nope")
        assert err.value.request_id == "req-43"


def test_health_serves_and_reflection_lists_the_service(client, server):
    assert client.health() == "SERVING"
    assert client.health("unmask.v1.Unmask") == "SERVING"
    models = client.list_models()
    assert [m.name for m in models] == ["default"] and models[0].ready
    assert models[0].architecture == "diffusion" and models[0].max_seq_len == 256
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")])))  # fmt: skip
        names = {s.name for s in reply.list_services_response.service}
    assert {"unmask.v1.Unmask", "grpc.health.v1.Health"} <= names


def test_health_is_not_serving_until_the_model_is_loaded(tiny_model_dir):
    srv = ServerThread(Settings(model=str(tiny_model_dir), device="cpu"))
    try:
        port = srv.start(wait_ready=False)
        with Client(f"127.0.0.1:{port}") as c:
            assert c.health() == "NOT_SERVING"  # loading in the background
            c.wait_ready(timeout=120)
            assert c.generate("a", **SMALL).usage["generated_tokens"] == 8
    finally:
        srv.stop()


# ---- auth and TLS --------------------------------------------------------------------------


def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return key, cert


def test_auth_and_tls_together(generator, tmp_path):
    key, cert = _self_signed(tmp_path)
    settings = Settings(auth_tokens=("s3cret", "other"), tls_cert=str(cert), tls_key=str(key))
    with ServerThread(settings, generator=generator) as srv:
        target = f"127.0.0.1:{srv.port}"
        for token in (None, "wrong", "s3cret-not"):
            with Client(target, token=token, root_certificates=cert) as c:
                with pytest.raises(ServiceError) as err:
                    c.generate("a", **SMALL)
                assert err.value.code == "UNAUTHENTICATED"
                assert c.health() == "SERVING"  # health stays open for probes
        with Client(target, token="s3cret", root_certificates=cert) as c:
            assert c.generate("a", **SMALL).usage["generated_tokens"] == 8
            assert [e["type"] for e in c.stream("a", **SMALL)][-1] == "final"
        with Client(target, token="s3cret", timeout=5) as plain:  # no TLS: no connection
            with pytest.raises(ServiceError) as err:
                plain.generate("a", **SMALL)
            assert err.value.code == "UNAVAILABLE"


def test_without_tokens_auth_is_off(client):
    with Client(client._c.target, token="anything") as c:
        assert c.list_models()


# ---- batches -------------------------------------------------------------------------------


def _rows(n, **params):
    p = {**SMALL, **params}
    return [{"custom_id": f"item-{i}", "body": {"prompt": f"Item {i}", "params": p}}
            for i in range(n)]  # fmt: skip


def test_batch_submit_status_results(client):
    rows = _rows(3) + [
        {"custom_id": "fill", "body": {"modality": "code", "template": "x = [MASK:3]\n",
                                       "params": {"steps": 2}}},
        {"custom_id": "song", "body": {"midi_settings": {"bars": 1, "voices": 1},
                                       "params": {"gen_length": 8, "steps": 2,
                                                  "temperature": 1.0}}},
        {"custom_id": "bad-midi", "body": {"midi_b64": "TVRoZA==", "params": SMALL}},
    ]  # fmt: skip
    job = client.submit_batch(rows)
    assert job.id.startswith("batch_") and job.counts["total"] == 6
    job = client.wait_batch(job.id, timeout=120)
    assert job.status == "completed"
    results = {r["custom_id"]: r for r in client.batch_results(job.id)}
    assert set(results) == {r["custom_id"] for r in rows}
    assert results["item-1"]["status"] == "succeeded"
    assert results["item-1"]["response"]["text"].startswith("Item 1")
    assert results["fill"]["response"]["text"].startswith("x = ")
    bad = results["bad-midi"]
    assert bad["status"] == "failed" and bad["error"]["code"] == "INVALID_ARGUMENT"
    assert job.counts["failed"] == 1 and job.counts["pending"] == 0
    ok = job.counts["succeeded"] + job.counts["failed"]
    assert ok == 6  # a MIDI item of a random model may fail to decode: still accounted for
    listed, _ = client.list_batches()
    assert listed[0].id == job.id


def test_batch_resubmission_with_an_idempotency_key_gives_the_same_batch(client):
    first = client.submit_batch(_rows(2), idempotency_key="nightly-1")
    again = client.submit_batch(_rows(2), idempotency_key="nightly-1")
    other = client.submit_batch(_rows(2), idempotency_key="nightly-2")
    assert first.id == again.id != other.id
    for b in (first, other):
        client.wait_batch(b.id, timeout=120)


def test_cancelling_a_batch_keeps_finished_items(client):
    rows = _rows(1) + _rows(5, gen_length=128, steps=128)[1:]  # window 2: the rest wait
    job = client.submit_batch(rows)
    end = time.monotonic() + 60
    while client.get_batch(job.id).counts["succeeded"] < 1:
        assert time.monotonic() < end
        time.sleep(0.05)
    cancelled = client.cancel_batch(job.id)
    assert cancelled.status in ("cancelling", "cancelled")
    job = client.wait_batch(job.id, timeout=60)
    assert job.status == "cancelled" and job.counts["pending"] == 0
    assert job.counts["succeeded"] >= 1 and job.counts["cancelled"] >= 3
    results = {r["custom_id"]: r for r in client.batch_results(job.id)}
    assert results["item-0"]["status"] == "succeeded" and len(results) == 5
    assert {r["error"]["code"] for r in results.values() if r["status"] == "cancelled"} == {
        "CANCELLED"
    }


def test_batch_limits_and_item_errors(client):
    with pytest.raises(ServiceError) as err:
        client.submit_batch(_rows(7))
    assert err.value.code == "RESOURCE_EXHAUSTED"
    rows = _rows(2)
    rows[1]["body"]["params"] = {"top_p": 5.0}
    with pytest.raises(ServiceError) as err:
        client.submit_batch(rows)
    assert err.value.code == "INVALID_ARGUMENT"
    assert err.value.field == "items[1].request.params.top_p"
    with pytest.raises(ServiceError) as err:
        client.submit_batch(_rows(1) + _rows(1))
    assert err.value.field == "items[1].custom_id"


# ---- torch-free front end ------------------------------------------------------------------


def test_the_front_end_imports_without_torch():
    probe = (
        "import sys, time; t = time.perf_counter()\n"
        "import unmask.cli; unmask.cli.build_parser('serve')\n"
        "import unmask.service.server, unmask.service.celery_dispatch, unmask.client\n"
        "print('torch' in sys.modules, round(time.perf_counter() - t, 3))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    has_torch, seconds = out.stdout.split()
    assert has_torch == "False"
    assert float(seconds) < 2.0  # typically ~0.3 s; generous for a loaded CI machine


def test_calls_while_the_model_loads_are_unavailable_and_a_batch_waits_for_it(
    tiny_model_dir, monkeypatch
):
    """A model that is still loading is UNAVAILABLE (retry), not INTERNAL, and a batch
    submitted meanwhile runs once it has loaded instead of failing every item."""
    import threading

    from unmask.models.generation import Generator

    loaded = threading.Event()
    real_load = Generator.load.__func__

    def slow_load(cls, *args, **kwargs):
        loaded.wait(30)  # held until the test has made its calls
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(Generator, "load", classmethod(slow_load))
    srv = ServerThread(Settings(model=str(tiny_model_dir)))
    srv.start(wait_ready=False)
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            with pytest.raises(ServiceError) as err:
                c.generate("Hi", gen_length=8, steps=2)
            assert err.value.code == "UNAVAILABLE" and "loading" in err.value.message
            batch = c.submit_batch([{"custom_id": f"b{i}", "body": {
                "prompt": "Hi", "params": {"gen_length": 8, "steps": 2}}} for i in range(3)])  # fmt: skip
            time.sleep(0.5)  # the batch runner tries (and must put the items back)
            assert c.get_batch(batch.id).counts["failed"] == 0
            loaded.set()
            done = c.wait_batch(batch.id, timeout=60)
            assert done.counts["succeeded"] == 3, done.counts
    finally:
        loaded.set()
        srv.stop()


# ---- what a vLLM / OpenAI user looks for: echoed params, stop, n, token confidences --------


def test_the_response_echoes_the_params_it_ran_with_and_resending_them_repeats_it(client):
    g = client.generate("Echo", gen_length=12, temperature=1.0, seed=5, block_length=4)
    assert g.params["seed"] == 5 and g.params["gen_length"] == 12
    assert g.params["temperature"] == 1.0 and g.params["block_length"] == 4
    assert {"steps", "top_p", "position_score", "use_cache"} <= set(g.params)  # resolved
    again = client.generate("Echo", params=g.params)
    assert again.text == g.text and again.params == g.params


def test_stop_strings_end_the_output_before_the_first_one_after_the_prompt(client):
    knobs = {"gen_length": 24, "steps": 24, "stop_at_eos": False}
    full = client.generate("Stop", **knobs)
    generated = full.text[len("Stop") :]
    stop = generated[len(generated) // 2 :][:2]
    assert stop.strip(), f"pick another seed: {generated!r}"
    cut = client.generate("Stop", stop=[stop, "never-there"], **knobs)
    assert cut.text == "Stop" + generated[: generated.index(stop)]
    assert cut.usage["finish_reason"] == "stop"
    with pytest.raises(ServiceError) as err:
        client.generate("x", stop=[""], gen_length=8, steps=2)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field == "stop[0]"


def test_n_samples_run_together_with_consecutive_seeds(client):
    g = client.generate("Many", n=3, gen_length=10, steps=5, temperature=1.0, seed=20)
    assert len(g.samples) == 3 and g.text == g.samples[0].text
    assert [s.params["seed"] for s in g.samples] == [20, 21, 22]
    assert len({s.job_id for s in g.samples}) == 3
    alone = client.generate("Many", gen_length=10, steps=5, temperature=1.0, seed=21)
    assert alone.text == g.samples[1].text
    with pytest.raises(ServiceError) as err:
        list(client.stream("Many", n=2, gen_length=8, steps=2))
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field == "n"
    with pytest.raises(ServiceError) as err:
        client.submit_batch([{"custom_id": "a", "body": {"prompt": "x", "n": 2}}])
    assert err.value.field == "items[0].request.n"


def test_return_tokens_gives_each_generated_token_and_its_confidence(client):
    g = client.generate("Tok", gen_length=10, steps=5, stop_at_eos=False, return_tokens=True)
    assert len(g.tokens) == g.usage["generated_tokens"] == 10
    positions = [p for p, _, _ in g.tokens]
    assert positions == sorted(set(positions))
    assert all(0.0 <= c <= 1.0 for _, _, c in g.tokens)
    assert client.generate("Tok", gen_length=10, steps=5).tokens == []  # only when asked
