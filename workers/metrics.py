"""A worker's Prometheus metrics (`unmask worker --metrics-port N`, 0 = off).

The worker runs Celery's threads pool: one process, one Engine, so one exporter per process,
started once the model has loaded (tasks.py). Besides its Engine's `unmask_engine_*` metrics
(unmask/metrics.py: batch size, steps, tokens committed, job latency by status):

- `unmask_worker_model_load_seconds`: how long loading the model took;
- `unmask_worker_device_memory_bytes{device}`: torch's allocated memory on a CUDA device, else
  the process's resident set size (read when scraped);
- `unmask_worker_engine_load`: jobs queued in or run by the Engine (read when scraped).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable

from prometheus_client import Gauge

from unmask.metrics import Exporter, start_exporter
from unmask.settings import Settings

MODEL_LOAD_SECONDS = Gauge("unmask_worker_model_load_seconds", "Time taken to load the model")
DEVICE_MEMORY = Gauge(
    "unmask_worker_device_memory_bytes",
    "Memory in use: torch's allocations on a CUDA device, else the process's resident set",
    ["device"],
)
ENGINE_LOAD = Gauge("unmask_worker_engine_load", "Jobs queued in or run by the Engine")


def device_memory_bytes(device: str) -> float:
    """Allocated CUDA memory on a `cuda[:N]` device; otherwise the process's RSS."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.memory_allocated(torch.device(device)))
    return float(_rss_bytes())


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:  # Linux: the current resident set, in pages
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak (Linux: KiB)


def start(
    settings: Settings, *, device: str, load_seconds: float, engine_load: Callable[[], int]
) -> Exporter:
    """Set the model's gauges and serve /metrics on settings.host:settings.metrics_port."""
    MODEL_LOAD_SECONDS.set(load_seconds)
    DEVICE_MEMORY.labels(device).set_function(lambda: device_memory_bytes(device))
    ENGINE_LOAD.set_function(lambda: float(engine_load()))
    return start_exporter(settings.host, settings.metrics_port)
