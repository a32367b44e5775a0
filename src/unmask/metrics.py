"""Prometheus pieces both sides share: the Engine's metrics and the /metrics exporter.

The Engine knows nothing of Prometheus; it reports to an `EngineObserver` (engine/engine.py).
`EngineMetrics` is that observer, feeding the `unmask_engine_*` metrics below; a worker
(workers/metrics.py) and the embedded front end (service/metrics.py) hand one to their Engine.
Torch-free. Metrics live in prometheus_client's process-wide default registry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http.server import HTTPServer
from threading import Thread

from prometheus_client import Counter, Histogram, start_http_server

from unmask.errors import InvalidArgument

log = logging.getLogger("unmask.metrics")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

ENGINE_BATCH_SIZE = Histogram(
    "unmask_engine_batch_size", "Jobs in one batched forward pass", buckets=BATCH_BUCKETS
)
ENGINE_FORWARD_SECONDS = Histogram(
    "unmask_engine_forward_seconds", "Time of one batched forward pass", buckets=LATENCY_BUCKETS
)
ENGINE_JOB_STEPS = Counter(
    "unmask_engine_job_steps", "Denoising steps applied to jobs (the sum of batch sizes)"
)
ENGINE_TOKENS_COMMITTED = Counter(
    "unmask_engine_tokens_committed", "Tokens committed by denoising steps (remasked ones again)"
)
ENGINE_TOKENS_PER_STEP = Histogram(
    "unmask_engine_tokens_per_step",
    "Tokens one job committed in one denoising step (one forward)",
    buckets=TOKEN_BUCKETS,
)
ENGINE_JOB_LATENCY = Histogram(
    "unmask_engine_job_latency_seconds",
    "From submission to the Engine to the job's end, by final status",
    ["status"],
    buckets=LATENCY_BUCKETS,
)


class EngineMetrics:
    """An EngineObserver that feeds the unmask_engine_* metrics."""

    def forward(self, batch_size: int, seconds: float) -> None:
        ENGINE_BATCH_SIZE.observe(batch_size)
        ENGINE_FORWARD_SECONDS.observe(seconds)

    def job_step(self, committed: int) -> None:
        ENGINE_JOB_STEPS.inc()
        ENGINE_TOKENS_COMMITTED.inc(committed)
        ENGINE_TOKENS_PER_STEP.observe(committed)

    def job_ended(self, status: str, seconds: float) -> None:
        ENGINE_JOB_LATENCY.labels(status).observe(seconds)


@dataclass
class Exporter:
    """The /metrics HTTP server (prometheus_client's, on a thread of its own)."""

    server: HTTPServer  # wsgiref's, threading
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def check_port(host: str, port: int) -> None:
    """Refuse, before any work, a metrics port that cannot be bound (in use, not our address).
    The exporter starts later (a worker's, once its model has loaded)."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise _unavailable(host, port, exc) from None


def _unavailable(host: str, port: int, exc: OSError) -> InvalidArgument:
    return InvalidArgument(
        f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): the port is in use "
        "(or the address is not this machine's)", field="metrics_port", value=port,
    )  # fmt: skip


def start_exporter(host: str, port: int) -> Exporter:
    """Serve the default registry at http://host:port/metrics; a port in use is one clear
    error naming `metrics_port`."""
    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise _unavailable(host, port, exc) from None
    exporter = Exporter(server, thread)
    log.info("metrics at http://%s:%d/metrics", host, exporter.port)
    return exporter
