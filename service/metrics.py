"""The front end's Prometheus metrics (`unmask serve --metrics-port N`, 0 = off).

- per call (counted by the request id interceptor, which knows method, status and duration):
  `unmask_rpc_requests_total{service,method,code}`, `unmask_rpc_duration_seconds{service,method}`,
  `unmask_rpc_in_flight{service,method}`;
- per model, read from the dispatcher's `models()` when scraped: `unmask_queue_depth{model}`
  (jobs queued or running), `unmask_live_workers{model}`, `unmask_model_ready{model}`;
- the embedded default (local dispatcher) also exports its Engine's `unmask_engine_*`
  metrics (unmask/metrics.py).

Torch-free, like the rest of the front end.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from unmask.metrics import LATENCY_BUCKETS, Exporter, start_exporter
from unmask.settings import Settings

log = logging.getLogger("unmask.service.metrics")

RPC_REQUESTS = Counter(
    "unmask_rpc_requests", "Calls ended, by method and gRPC status code",
    ["service", "method", "code"],
)  # fmt: skip
RPC_DURATION = Histogram(
    "unmask_rpc_duration_seconds", "Call duration (a stream: until its last message)",
    ["service", "method"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
RPC_IN_FLIGHT = Gauge("unmask_rpc_in_flight", "Calls under way", ["service", "method"])

MODELS_TIMEOUT_S = 2.0  # a scrape waits this long for the dispatcher's models()
_CODES = frozenset(c.name for c in grpc.StatusCode)


def _split(method: str) -> tuple[str, str]:
    """'/unmask.v1.Unmask/Generate' -> ('unmask.v1.Unmask', 'Generate')."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class RpcMetrics:
    """The calls' metrics, fed by RequestIdInterceptor (service/interceptors.py)."""

    def started(self, method: str) -> None:
        RPC_IN_FLIGHT.labels(*_split(method)).inc()

    def ended(self, method: str, outcome: str, seconds: float) -> None:
        """`outcome`: the status code's name; anything else (an exception that escaped a
        handler) reaches the client as UNKNOWN and is counted so."""
        service, name = _split(method)
        RPC_REQUESTS.labels(service, name, outcome if outcome in _CODES else "UNKNOWN").inc()
        RPC_DURATION.labels(service, name).observe(seconds)
        RPC_IN_FLIGHT.labels(service, name).dec()  # last: no call in flight = all counted


class _ModelsCollector(Collector):
    """Queue depth, live workers and readiness per model, asked of every running front end's
    dispatcher (on its own event loop) at scrape time. One per process: the default registry
    refuses two collectors of the same names."""

    def __init__(self) -> None:
        self._sources: list[tuple[Any, asyncio.AbstractEventLoop]] = []
        self._lock = threading.Lock()

    def add(self, dispatcher: Any, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._sources.append((dispatcher, loop))

    def remove(self, dispatcher: Any) -> None:
        with self._lock:
            self._sources = [s for s in self._sources if s[0] is not dispatcher]

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())  # names only: registering must not ask the dispatchers

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("unmask_queue_depth", "Jobs queued or running", labels=["model"]),
            GaugeMetricFamily("unmask_live_workers", "Workers serving the model (embedded: 1)",
                              labels=["model"]),
            GaugeMetricFamily("unmask_model_ready", "1 when the model can run jobs",
                              labels=["model"]),
        ]  # fmt: skip

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth, live, ready = self._families()
        totals: dict[str, list[float]] = {}
        with self._lock:
            sources = list(self._sources)
        for dispatcher, loop in sources:
            try:
                future = asyncio.run_coroutine_threadsafe(dispatcher.models(), loop)
                models = future.result(MODELS_TIMEOUT_S)
            except Exception as exc:  # Redis down, a stopping loop: these gauges go missing
                log.warning("metrics: the dispatcher's models() failed: %s", exc)
                continue
            for m in models:
                t = totals.setdefault(m.name, [0.0, 0.0, 0.0])
                t[0] += m.queue_length
                t[1] += m.live_workers
                t[2] = max(t[2], 1.0 if m.ready else 0.0)
        for name, (queued, workers, is_ready) in sorted(totals.items()):
            depth.add_metric([name], queued)
            live.add_metric([name], workers)
            ready.add_metric([name], is_ready)
        yield from (depth, live, ready)


_models = _ModelsCollector()
REGISTRY.register(_models)


class FrontEndMetrics:
    """A running front end's exporter and its dispatcher's per-model gauges."""

    def __init__(self, exporter: Exporter, dispatcher: Any) -> None:
        self.exporter = exporter
        self.dispatcher = dispatcher

    @property
    def port(self) -> int:
        return self.exporter.port

    @classmethod
    def start(cls, settings: Settings, dispatcher: Any) -> FrontEndMetrics:
        """Serve /metrics on settings.host:settings.metrics_port (call on the server's loop)."""
        exporter = start_exporter(settings.host, settings.metrics_port)
        _models.add(dispatcher, asyncio.get_running_loop())
        return cls(exporter, dispatcher)

    def close(self) -> None:
        _models.remove(self.dispatcher)
        self.exporter.close()
