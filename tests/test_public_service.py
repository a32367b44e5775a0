"""Public checkpoints through the service: a tiny SDAR fixture served by `unmask serve --model DIR`
(a real subprocess) and a tiny LLaDA fixture by a real Celery worker behind the front end, both
called with the gRPC client: generate, stream, infill, chat, ListModels; our vocabulary's
features are refused with INVALID_ARGUMENT naming the field and the server stays up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from public_fixtures import write_checkpoint
from redis_fixtures import (  # noqa: F401
    WorkerProcess,
    free_port,
    redis_server,
    wait_until,
    worker_env,
)

from unmask.client import Client, ServiceError
from unmask.models.hf_checkpoint import load_hf
from unmask.service.server import ServerThread
from unmask.settings import Settings

SMALL = {"gen_length": 8, "steps": 4}


def _exercise(client: Client, family: str, directory) -> None:
    """The calls every serving path must answer for a public text model."""
    g = client.generate("the quick brown", seed=1, **SMALL)
    assert g.text.startswith("the quick brown") and g.usage["generated_tokens"] <= 8

    events = list(client.stream("rain falls", **SMALL))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "final" and "step" in kinds
    assert events[-1]["generation"].text.startswith("rain falls")

    head, tail = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    f = client.infill([head, 4, tail], modality="code", steps=4)
    assert f.text.startswith(head) and f.text.endswith(tail)

    c = client.chat([("user", "Write a haiku about rain")], **SMALL)
    assert c.usage["prompt_tokens"] > 5  # the template's markers and the message
    assert "<|im_start|>" not in c.text and "<|start_header_id|>" not in c.text

    (card,) = client.list_models()
    _, _, meta = load_hf(directory, dtype="float32")
    assert card.family == family and card.parameters == meta["parameters"] > 0
    assert card.mask_id == meta["mask_id"] and card.content_hash == meta["content_hash"]
    assert card.dtype == "float32" and card.modalities == ["text", "code"]
    assert (card.attention, card.block_size) == (meta["attention"], meta["block_size"])

    refusals = [(lambda: client.midi(n_bars=2, **SMALL), "modality")]
    if "dual" not in meta["cache_modes"]:  # block-causal: the exact prefix cache only
        refusals.append((lambda: client.generate("x", use_cache="dual", **SMALL), "params.cache"))
    for call, field in refusals:
        with pytest.raises(ServiceError) as err:
            call()
        assert err.value.code == "INVALID_ARGUMENT" and err.value.field == field
    assert client.generate("hello", **SMALL).text.startswith("hello")  # still up


def test_unmask_serve_with_a_public_checkpoint(tmp_path):
    d = write_checkpoint(tmp_path / "SDAR-tiny", "sdar")
    port = free_port()
    env = {**os.environ, "UNMASK_DTYPE": "float32", "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "serve.log").open("wb")
    cmd = [sys.executable, "-m", "unmask", "serve", "--model", str(d), "--port", str(port),
           "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_ready(timeout=60)
            _exercise(client, "sdar", d)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_celery_worker_with_a_public_checkpoint(tmp_path, redis_server):  # noqa: F811
    from unmask.workers.client import JobQueue

    d = write_checkpoint(tmp_path / "LLaDA-tiny", "llada")
    settings = Settings(broker_url=redis_server.url, model_name="llada", heartbeat_s=0.5,
                        result_ttl_s=600)  # fmt: skip
    env = worker_env(redis_server.url, d, heartbeat_s=0.5, dtype="float32")
    worker = WorkerProcess(env, tmp_path / "worker.log", ("--model-name", "llada",
                                                          "--concurrency", "4")).start()  # fmt: skip
    jobs = JobQueue(settings)
    try:
        worker.wait_ready(lambda: jobs.live_workers("llada"))
        with ServerThread(settings) as srv, Client(f"127.0.0.1:{srv.port}", timeout=60) as client:
            client.wait_ready(timeout=30)
            _exercise(client, "llada", d)
    finally:
        worker.stop()
        jobs.close()


def test_unmask_generate_chat_in_process(tmp_path):
    import json

    d = write_checkpoint(tmp_path / "Dream-tiny", "dream")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "unmask", "generate", "--model", str(d), "--length", "8",
            "--steps", "4", "--dtype", "float32"]  # fmt: skip
    out = subprocess.run([*base, "--chat", "Write a haiku about rain", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["usage"]["prompt_tokens"] > 5 and doc["params"]["use_cache"] == "none"
    bad = subprocess.run([*base, "--modality", "midi"], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr and "modality" in bad.stderr


def test_a_checkpoint_that_cannot_load_leaves_the_server_up_and_says_why(tmp_path):
    import json

    d = write_checkpoint(tmp_path / "bad", "sdar")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["MysteryLM"]}))
    srv = ServerThread(Settings(model=str(d)))
    port = srv.start(wait_ready=False)
    try:
        with Client(f"127.0.0.1:{port}") as client:
            messages = []

            def failed_to_load() -> bool:
                with pytest.raises(ServiceError) as err:
                    client.generate("hello", **SMALL)
                assert err.value.code == "UNAVAILABLE"  # loading, then failed to load
                messages.append(err.value.message)
                return "failed to load" in err.value.message

            wait_until(failed_to_load, 60, "the load failure")
            assert failed_to_load()  # the server answers, and keeps answering
            assert "MysteryLM" in messages[-1] and "SDARForCausalLM" in messages[-1]
            assert client.health() == "NOT_SERVING"
    finally:
        srv.stop()
