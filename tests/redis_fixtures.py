"""Real infrastructure for queue tests: a private redis-server and `unmask worker` processes.

Import from a test module (`tests/` is on sys.path): `from redis_fixtures import ...`.
Nothing is mocked: the server is the `redis-server` binary on a free port with persistence off,
the workers are `python -m unmask worker` subprocesses configured through UNMASK_* variables.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def in_ci() -> bool:
    """`.ci/run` exports CI=true (as most CI services do)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_or_skip(reason: str) -> None:
    """Skip on a developer's machine, fail in CI: a CI run must never go green by skipping the
    suites that use the real Redis and Celery."""
    if in_ci():
        pytest.fail(f"{reason}; CI requires it", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.05):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def retry_while_redis_down(fn: Callable[[], object], timeout: float = 30.0, every: float = 0.1):
    """fn() again while Redis is unreachable (being restarted, or cut off by a proxy)."""
    import redis  # the fixtures' other users need no client library

    from unmask.workers.protocol import BrokerUnavailable

    end = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (BrokerUnavailable, redis.RedisError):
            if time.monotonic() > end:
                raise
            time.sleep(every)


class RedisServer:
    """A private redis-server on a free port; persistence off unless `persistence` says otherwise.
    `start()` again after a kill restarts it on the same port and data directory."""

    def __init__(
        self, directory: Path, persistence: tuple[str, ...] = ("--appendonly", "no")
    ) -> None:
        self.port = free_port()
        self.directory = directory
        self.persistence = persistence
        self.log = directory / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            require_or_skip("redis-server is not installed (the queue suites need the real one)")
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               *self.persistence, "--dir", str(self.directory)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        self.starts += 1
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def up() -> bool:
            try:
                # a restarted server answers LOADING until it has replayed its append-only file
                return bool(client.ping())
            except redis.RedisError:
                assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
                return False

        wait_until(up, 20, "redis-server to answer PING")
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class PersistentRedis(RedisServer):
    """redis-server with the append-only file on (fsync on every write by default), restartable
    on the same port with the same data directory (as compose.yaml runs it)."""

    def __init__(self, directory: Path, fsync: str = "always") -> None:
        super().__init__(directory, ("--appendonly", "yes", "--appendfsync", fsync,
                                     "--maxmemory-policy", "noeviction"))  # fmt: skip

    def kill9(self) -> None:
        self.stop()  # SIGKILL: no graceful save, only the append-only file survives

    def stop_gracefully(self) -> None:
        """SIGTERM, as `docker compose restart` sends: Redis flushes its append-only file."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)


def worker_env(broker_url: str, model_dir: Path, **settings: object) -> dict[str, str]:
    """UNMASK_* variables of a CPU test worker (one kernel thread, results kept 10 minutes);
    `settings` adds or overrides Settings fields by name: worker_env(..., max_batch=4)."""
    env = {"UNMASK_BROKER_URL": broker_url, "UNMASK_MODEL": str(model_dir),
           "UNMASK_DEVICE": "cpu", "UNMASK_RESULT_TTL_S": "600",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
    return env | {f"UNMASK_{k.upper()}": str(v) for k, v in settings.items()}


class WorkerProcess:
    """One `unmask worker` subprocess; `env` holds its UNMASK_* settings."""

    def __init__(self, env: dict[str, str], log: Path, args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.log = log
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.env}
        cmd = [sys.executable, "-m", "unmask", "worker", "--loglevel", "INFO", *self.args]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, live_workers: Callable[[], list[dict]], timeout: float = 90) -> None:
        """Until this process's heartbeat is in Redis (model loaded, consuming)."""

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.tail()}")
            return any(w.get("pid") == self.pid for w in live_workers())

        wait_until(ready, timeout, f"worker {self.pid} heartbeat", every=0.1)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill9()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()
