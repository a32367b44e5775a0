"""The CPU stack of compose.yaml, built and run for real (issue 16).

scripts/compose-up-local.sh builds the image and starts redis, server and worker-cpu under a
compose project of this test's own, with free host ports; then, through the published gRPC port
and the project's client: text, code and a MIDI file; a batch whose worker container is killed
(`docker kill`) mid-batch and started again (`docker compose up -d worker-cpu`): every item
completes, and is stored, exactly once; `docker compose restart redis` with a batch running:
nothing lost, every item done once within RESTART_WAIT_S; `docker compose down -v`: no
container, network or volume of the project is left. The measured times are printed (`-s`
shows them; docs/docker.md has a run's numbers).

Runs only when asked: UNMASK_DOCKER_TESTS=1 (`make test-docker`, which `.ci/run` calls when a
Docker daemon answers). Asked, and no Docker daemon or `docker compose`: the test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO
from redis_fixtures import wait_until

from unmask.client import Client, ServiceError
from unmask.workers.protocol import completions_key, deliveries_key

pytestmark = pytest.mark.docker

ASKED = os.environ.get("UNMASK_DOCKER_TESTS") == "1"
UP_TIMEOUT_S = 1500  # a fresh machine: local base images + the image build (~4 min here)
BATCH_ITEMS = 24
ITEM = {"gen_length": 64, "steps": 32}
RESTART_WAIT_S = 90  # a batch running through a Redis restart finishes within this (<< 600 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _docker_problem() -> str | None:
    if shutil.which("docker") is None:
        return "there is no docker CLI"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        return "no Docker daemon answers (`docker info` fails)"
    return None


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    grpc_port: int
    http_port: int
    times: dict[str, float] = field(default_factory=dict)
    batch_id: str = ""
    down: bool = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def compose(self, *args: str, timeout: float = 300) -> str:
        out = subprocess.run(["docker", "compose", "--profile", "cpu", *args], cwd=REPO,
                             env=self.env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
        assert out.returncode == 0, f"docker compose {' '.join(args)}:\n{out.stdout}{out.stderr}"
        return out.stdout

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-a", "-q", service).split()
        assert len(ids) == 1, (service, ids)
        return ids[0]

    def labelled(self, kind: str) -> list[str]:
        """The project's containers / networks / volumes that Docker still has."""
        cmd = {"container": ["ps", "-a"], "network": ["network", "ls"], "volume": ["volume", "ls"]}
        label = f"label=com.docker.compose.project={self.project}"
        out = subprocess.run(["docker", *cmd[kind], "-q", "--filter", label], capture_output=True,
                             text=True, timeout=60, check=True)  # fmt: skip
        return out.stdout.split()

    def logs(self, container: str) -> str:
        out = subprocess.run(["docker", "logs", container], capture_output=True, text=True,
                             timeout=60, check=True)  # fmt: skip
        return out.stdout + out.stderr


def _compose_env(project: str, grpc_port: int, http_port: int, env_file: Path) -> dict[str, str]:
    # the shell's own UNMASK_* (auth tokens, a broker URL) must not leak into the stack
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNMASK_")}
    env.update(COMPOSE_PROJECT_NAME=project, UNMASK_GRPC_PUBLISHED_PORT=str(grpc_port),
               UNMASK_HTTP_PUBLISHED_PORT=str(http_port), UNMASK_COMPOSE_ENV_FILE=str(env_file))  # fmt: skip
    for name in ("UNMASK_BASE_IMAGE", "UNMASK_REDIS_IMAGE", "UNMASK_WHEELHOUSE"):
        if os.environ.get(name):  # chosen by whoever runs the test
            env[name] = os.environ[name]
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not ASKED:
        pytest.skip("the Docker stack test runs with `make test-docker` (UNMASK_DOCKER_TESTS=1)")
    problem = _docker_problem()
    if problem:
        pytest.fail(f"UNMASK_DOCKER_TESTS=1 but {problem}")
    project = f"unmask-test-{os.getpid()}"
    env_file = tmp_path_factory.mktemp("compose") / "compose.env"
    s = Stack(project, {}, _free_port(), _free_port())
    s.env = _compose_env(project, s.grpc_port, s.http_port, env_file)
    t0 = time.monotonic()
    up = subprocess.run([str(REPO / "scripts" / "compose-up-local.sh")], cwd=REPO, env=s.env,
                        capture_output=True, text=True, timeout=UP_TIMEOUT_S)  # fmt: skip
    s.times["up (build + healthy)"] = time.monotonic() - t0
    print(up.stdout[-4000:], up.stderr[-2000:])
    try:
        assert up.returncode == 0, f"compose-up-local.sh failed:\n{up.stdout[-6000:]}{up.stderr}"
        for line in env_file.read_text().splitlines():  # the base images etc. it chose
            name, _, value = line.partition("=")
            s.env[name] = value
        yield s
    finally:
        if not s.down:
            subprocess.run(["docker", "compose", "--profile", "cpu", "down", "-v",
                            "--remove-orphans"], cwd=REPO, env=s.env, capture_output=True,
                           timeout=300)  # fmt: skip
        print("\ncompose stack times:", {k: round(v, 1) for k, v in s.times.items()})


def test_the_front_end_serves_through_the_published_ports(stack):
    t0 = time.monotonic()
    with Client(stack.target) as c:
        c.wait_ready(timeout=60)
        assert c.health() == "SERVING"
        model = c.get_model()
    stack.times["SERVING after up"] = time.monotonic() - t0
    assert model.dispatcher == "celery" and model.live_workers >= 1, model
    # the HTTP gateway + playground, published on loopback
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/", timeout=30) as r:
        assert r.status == 200


def test_text_code_and_midi_through_the_grpc_client(stack):
    with Client(stack.target, timeout=120) as c:
        text = c.generate("Once upon a time", gen_length=32, seed=1)
        code = c.generate("def add(a, b):", modality="code", gen_length=32, seed=1)
        midi = c.midi(time_signature="4/4", voices=1, n_bars=2, seed=1, timeout=120)
    assert text.text.startswith("Once upon a time") and len(text.text) > len("Once upon a time")
    assert code.text.startswith("def add(a, b):") and code.modality == "code"
    assert midi.midi[:4] == b"MThd" and len(midi.midi) > 14  # a standard MIDI file with a track


def _rows(prefix: str, n: int) -> list[dict]:
    return [{"custom_id": f"{prefix}-{i}", "body": {"prompt": f"Story {i}:",
             "params": {**ITEM, "seed": i}}} for i in range(n)]  # fmt: skip


def _counters(stack: Stack, key, job_ids: list[str]) -> list[int]:
    """A per-job counter of the workers (workers/protocol.py) for each of `job_ids`."""
    values = _redis(stack, "mget", *[key(j) for j in job_ids])
    return [int(v) if v else 0 for v in values]


def _check_each_item_stored_once(stack: Stack, c: Client, batch_id: str, sent: list[dict]):
    n = len(sent)
    job = c.wait_batch(batch_id, timeout=300)
    assert job.status == "completed", job
    assert job.counts == {"total": n, "succeeded": n, "failed": 0, "cancelled": 0, "pending": 0}
    rows = list(c.batch_results(batch_id))
    assert sorted(r["custom_id"] for r in rows) == sorted(r["custom_id"] for r in sent)
    assert all(r["status"] == "succeeded" for r in rows), rows
    # each job ran to the end exactly once: `completions` counts every run that finished
    # unsuperseded (a rerun of a finished job would count twice); the result is stored once
    jobs = [r["response"]["job_id"] for r in rows]
    completions = _counters(stack, completions_key, jobs)
    ids = [r["custom_id"] for r in rows]
    assert completions == [1] * n, dict(zip(ids, completions, strict=True))
    return rows, _counters(stack, deliveries_key, jobs)


def _wait_until_in_flight(stack: Stack, c: Client, batch_id: str, worker: str) -> None:
    """Until an item of the batch has finished and the worker holds another one right now."""

    def in_flight() -> bool:
        counts = c.get_batch(batch_id).counts
        logs = stack.logs(worker)
        received = set(re.findall(r"Task unmask\.generate\[(\w+)\] received", logs))
        done = set(re.findall(r"Task unmask\.generate\[(\w+)\] succeeded", logs))
        return counts["succeeded"] >= 1 and counts["pending"] > 0 and bool(received - done)

    wait_until(in_flight, 180, "an item done and others in flight", every=0.2)


def test_a_killed_worker_container_loses_no_item_and_runs_none_twice(stack):
    with Client(stack.target, timeout=60) as c:
        sent = _rows("kill", BATCH_ITEMS)
        job = c.submit_batch(sent)
        stack.batch_id = job.id
        worker = stack.container("worker-cpu")
        _wait_until_in_flight(stack, c, job.id, worker)
        subprocess.run(["docker", "kill", worker], check=True, capture_output=True, timeout=60)
        t_kill = time.monotonic()
        at_kill = c.get_batch(job.id).counts
        stack.compose("up", "-d", "worker-cpu")
        stack.times["kill -> worker started again"] = time.monotonic() - t_kill
        again = "restarted" if stack.container("worker-cpu") == worker else "recreated"
        c.wait_batch(job.id, timeout=300)
        stack.times["kill -> batch done"] = time.monotonic() - t_kill
        rows, deliveries = _check_each_item_stored_once(stack, c, job.id, sent)
    # the kill hit work in flight: those items were delivered again, to the new worker process
    redelivered = [r["custom_id"] for r, d in zip(rows, deliveries, strict=True) if d > 1]
    print(f"\nworker killed with {at_kill}; redelivered: {sorted(redelivered)}; container {again}")
    assert redelivered, "the kill hit no item in flight"


def _after_unavailable(stack: Stack, call, timeout: float = 30.0):
    """`call()`, again while it fails with UNAVAILABLE (as a client retries that status): the
    front end's Redis connections fail fast, so the first call on each connection that Redis
    closed by its restart is refused once. The refusals are counted in stack.times."""
    end = time.monotonic() + timeout
    while True:
        try:
            return call()
        except ServiceError as exc:
            if exc.code != "UNAVAILABLE" or time.monotonic() > end:
                raise
            stack.times["UNAVAILABLE after redis restart"] = (
                stack.times.get("UNAVAILABLE after redis restart", 0) + 1
            )
            time.sleep(0.2)


def _redis(stack: Stack, *args: str) -> list[str]:
    return stack.compose("exec", "-T", "redis", "redis-cli", *args).splitlines()


def _held_by_redis(stack: Stack, batch_id: str, custom_ids: set[str]) -> dict[str, str]:
    """Where Redis holds each of `custom_ids` that has no result yet: the batch's list of items
    not yet dispatched, or its job's message on the queue or in kombu's `unacked` hash (what the
    visibility timeout restores)."""
    key = f"unmask:batch:{batch_id}"
    inflight = _redis(stack, "hgetall", f"{key}:inflight")
    job_of = dict(zip(inflight[::2], inflight[1::2], strict=True))
    pending = "\n".join(_redis(stack, "lrange", f"{key}:pending", "0", "-1"))
    queued = "\n".join(_redis(stack, "lrange", "unmask.default", "0", "-1"))
    unacked = "\n".join(_redis(stack, "hvals", "unacked"))
    where = {}
    for cid in custom_ids:
        job = re.search(r'"job_id":\s*"(\w+)"', job_of.get(cid, ""))
        if job and job.group(1) in queued:
            where[cid] = "queue"
        elif job and job.group(1) in unacked:
            where[cid] = "unacked"
        elif cid in pending:
            where[cid] = "pending"
    return where


def _restarts(container: str) -> int:
    """How often Docker restarted `container` (its restart policy: the process had exited)."""
    out = subprocess.run(["docker", "inspect", "-f", "{{.RestartCount}}", container],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return int(out.stdout)


def test_a_redis_restart_loses_nothing(stack):
    assert stack.batch_id, "needs the killed-worker batch"
    worker = stack.container("worker-cpu")
    with Client(stack.target, timeout=60) as c:
        done_before = c.get_batch(stack.batch_id)
        results_before = list(c.batch_results(stack.batch_id))
        sent = _rows("restart", BATCH_ITEMS)
        queued = c.submit_batch(sent)
        _wait_until_in_flight(stack, c, queued.id, worker)
        time.sleep(1.0)  # appendfsync everysec: the batch is in the append-only file
        t0 = time.monotonic()
        stack.compose("restart", "redis")
        c.wait_ready(timeout=120)
        stack.times["redis restart -> SERVING"] = time.monotonic() - t0
        # what had finished is all there
        assert _after_unavailable(stack, lambda: c.get_batch(stack.batch_id)) == done_before
        assert _after_unavailable(stack, lambda: list(c.batch_results(stack.batch_id))) == (
            results_before
        )
        assert _redis(stack, "config", "get", "appendonly") == ["appendonly", "yes"]
        # the batch that was running when Redis went away finishes within seconds, well before
        # the visibility timeout (600 s): what a worker could not give back while Redis was away
        # it requeues itself once Redis answers (workers/recovery.py, settle)
        try:
            _after_unavailable(stack, lambda: c.wait_batch(queued.id, timeout=RESTART_WAIT_S))
        except ServiceError as exc:
            if exc.code != "DEADLINE_EXCEEDED":
                raise
            stuck = _after_unavailable(stack, lambda: c.get_batch(queued.id))
            finished = {r["custom_id"] for r in c.batch_results(queued.id)}
            missing = {r["custom_id"] for r in sent} - finished
            held = _held_by_redis(stack, queued.id, missing)
            pytest.fail(
                f"{len(missing)} item(s) of a batch running through a Redis restart did not "
                f"finish within {RESTART_WAIT_S}s: {stuck.counts}; where Redis holds them: "
                f"{held}; lost: {sorted(missing - held.keys())}; worker container restarts: "
                f"{_restarts(worker)}"
            )
        stack.times["redis restart -> queued batch done"] = time.monotonic() - t0
        stack.times["worker container restarts (redis restart)"] = _restarts(worker)
        _check_each_item_stored_once(stack, c, queued.id, sent)
        text = _after_unavailable(stack, lambda: c.generate("After the restart", gen_length=16))
        assert text.text.startswith("After the restart")


def test_down_v_leaves_no_container_network_or_volume(stack):
    assert stack.labelled("volume"), "the Redis volume exists while the stack runs"
    t0 = time.monotonic()
    stack.compose("down", "-v")
    stack.times["down -v"] = time.monotonic() - t0
    stack.down = True
    for kind in ("container", "network", "volume"):
        assert stack.labelled(kind) == [], kind
