"""What the worker and its clients agree on: Redis key names, the task name, the result layout.

Torch-free and Celery-free, so the gRPC front end (through `client.JobQueue`) and the worker
(`tasks.py`) import the same names. Every key of one job starts with `unmask:job:<job_id>:`.

    unmask.<model>                       Celery queue (a Redis list) of one model
    unmask:job:<id>:result               the final result, JSON, SET NX with an expiry
    unmask:job:<id>:blob:<attempt>:<n>   large payloads (MIDI bytes, texts > 64 KiB) by reference
    unmask:job:<id>:events               Redis Stream of progress events (field "data": JSON)
    unmask:job:<id>:cancel               cancellation flag
    unmask:job:<id>:status               queued | running | <terminal status>
    unmask:job:<id>:deliveries           times a worker received the job (redeliveries included);
                                         a run's number here fences it (newest delivery wins)
    unmask:job:<id>:runs                 times the job was handed to an Engine
    unmask:job:<id>:completions          runs that reached the end (exactly-once proof: == 1)
    unmask:job:<id>:lost                 deliveries whose worker was lost mid-run (caps them)
    unmask:job:<id>:note                 why the job is where it is ("requeued after worker …")
    unmask:workers:<model>:<hostname>    worker heartbeat, with a TTL
    unmask:inflight:<model>              delivery tag -> the worker holding it (recovery.py)
"""

from __future__ import annotations

import json
from typing import Any

from unmask.engine.result import CANCELLED, DEADLINE, FAILED, SUCCEEDED, TERMINAL  # noqa: F401
from unmask.errors import QueueFull, Unavailable, UnmaskError

TASK_NAME = "unmask.generate"
QUEUE_PREFIX = "unmask."
KEY_PREFIX = "unmask:"
INLINE_LIMIT = 64 * 1024  # texts longer than this (in UTF-8 bytes) are stored by reference

# Statuses. The terminal ones are the Engine's.
QUEUED, RUNNING, UNKNOWN = "queued", "running", "unknown"


class QueueFullError(QueueFull):
    """A model's queue holds `max_queue` jobs already: back-pressure, try again later."""


class BrokerUnavailable(Unavailable):
    """Redis (broker and result store) cannot be reached."""


class ResultTimeout(UnmaskError, TimeoutError):
    """The job has no result yet after the caller's timeout."""

    code = "DEADLINE_EXCEEDED"


class ResultMissing(Unavailable):
    """A stored result refers to a payload that has expired or was never written."""


class WorkerLost(UnmaskError):
    """The job's worker died while running it, delivery after delivery: it is not run again."""


def queue_name(model_name: str) -> str:
    return f"{QUEUE_PREFIX}{model_name}"


def _job(job_id: str, suffix: str) -> str:
    return f"{KEY_PREFIX}job:{job_id}:{suffix}"


def result_key(job_id: str) -> str:
    return _job(job_id, "result")


def blob_key(job_id: str, attempt: str, name: str) -> str:
    return _job(job_id, f"blob:{attempt}:{name}")


def events_key(job_id: str) -> str:
    return _job(job_id, "events")


def cancel_key(job_id: str) -> str:
    return _job(job_id, "cancel")


def status_key(job_id: str) -> str:
    return _job(job_id, "status")


def completions_key(job_id: str) -> str:
    return _job(job_id, "completions")


def deliveries_key(job_id: str) -> str:
    return _job(job_id, "deliveries")


def runs_key(job_id: str) -> str:
    return _job(job_id, "runs")


def lost_key(job_id: str) -> str:
    return _job(job_id, "lost")


def note_key(job_id: str) -> str:
    return _job(job_id, "note")


def inflight_key(model_name: str) -> str:
    # not under `workers:`: readers of the heartbeats scan that prefix and expect JSON strings
    return f"{KEY_PREFIX}inflight:{model_name}"


def worker_key(model_name: str, hostname: str) -> str:
    return f"{KEY_PREFIX}workers:{model_name}:{hostname}"


def worker_pattern(model_name: str) -> str:
    return f"{KEY_PREFIX}workers:{model_name}:*"


def heartbeat_ttl(heartbeat_s: float) -> int:
    """Seconds a heartbeat key lives: three missed beats and the worker counts as gone."""
    return max(1, round(3 * heartbeat_s))


def encode_event(event: dict[str, Any]) -> dict[str, str]:
    """A stream entry's fields: one JSON document under "data"."""
    return {"data": json.dumps(event, separators=(",", ":"))}


def decode_event(fields: dict[Any, Any]) -> dict[str, Any]:
    raw = fields.get(b"data", fields.get("data"))
    if isinstance(raw, bytes):
        raw = raw.decode()
    return json.loads(raw) if raw else {}
