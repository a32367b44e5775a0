"""`JobQueue`: the front end's side of the worker queue. Torch-free (imports Celery, not torch).

    q = JobQueue(Settings.from_env())
    job_id = q.submit(request)                 # QueueFullError / BrokerUnavailable
    for stream_id, event in q.events(job_id):  # accepted, step..., block..., final
        ...
    result = q.result(job_id, timeout=60)      # a GenerationResult; payloads fetched back by ref

Fails fast: every call that touches Redis uses short socket timeouts and no retries, so an
unreachable Redis surfaces as `BrokerUnavailable` within about two seconds instead of a hang.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from unmask.engine.request import GenerationRequest
from unmask.engine.result import GenerationResult
from unmask.errors import InvalidArgument
from unmask.settings import Settings
from unmask.workers.protocol import (
    QUEUED,
    TASK_NAME,
    UNKNOWN,
    BrokerUnavailable,
    QueueFullError,
    ResultMissing,
    ResultTimeout,
    cancel_key,
    completions_key,
    decode_event,
    deliveries_key,
    events_key,
    note_key,
    queue_name,
    result_key,
    runs_key,
    status_key,
    worker_pattern,
)

CONNECT_TIMEOUT_S = 1.0
OP_TIMEOUT_S = 2.0
MAX_BLOCK_MS = 5000  # one XREAD BLOCK waits at most this long (then the loop checks again)


def redis_client(url: str, *, blocking: bool = False) -> redis.Redis:
    """A client that fails fast: short connect timeout, no retry; `blocking`: a read timeout
    long enough for one XREAD BLOCK of MAX_BLOCK_MS."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=OP_TIMEOUT_S + (MAX_BLOCK_MS / 1000 if blocking else 0.0),
        retry=Retry(NoBackoff(), 0),
    )


def check_broker(url: str) -> None:
    """Raise BrokerUnavailable unless Redis at `url` answers a PING within ~2 s."""
    client = redis_client(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise _unavailable(url, exc) from exc
    finally:
        client.close()


def _unavailable(url: str, exc: BaseException) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"the job queue's Redis at {_redact(url)} is unreachable ({exc}); "
        "start Redis or fix UNMASK_BROKER_URL / --broker",
        field="broker_url",
        value=_redact(url),
    )


def _redact(url: str) -> str:
    """redis://user:secret@host → redis://user:***@host (never echo a password)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


class JobQueue:
    def __init__(self, settings: Settings) -> None:
        if settings.embedded:
            raise InvalidArgument(
                "a job queue needs a Redis broker (UNMASK_BROKER_URL)", field="broker_url"
            )
        self.settings = settings
        self._redis = redis_client(settings.broker_url)
        self._blocking = redis_client(settings.broker_url, blocking=True)
        self._app: Any = None

    # ---- plumbing --------------------------------------------------------------------------
    @property
    def app(self) -> Any:
        if self._app is None:
            from unmask.workers.celery_app import make_app

            self._app = make_app(self.settings, client=True)
        return self._app

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise _unavailable(self.settings.broker_url, exc) from exc

    def close(self) -> None:
        self._redis.close()
        self._blocking.close()
        if self._app is not None:
            self._app.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- submit ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> str:
        """Publish a job on its model's queue; returns its job id (= the Celery task id)."""
        r = self._redis
        self._call(r.ping)  # fail fast, before Celery's own (slower) connection handling
        q = queue_name(request.model)
        waiting = self._call(r.llen, q)
        if waiting >= self.settings.max_queue:
            raise QueueFullError(
                f"the queue of model {request.model!r} is full ({waiting} jobs waiting, "
                f"limit {self.settings.max_queue}); try again later",
                field="queue",
                value=q,
            )
        try:
            self.app.send_task(
                TASK_NAME,
                args=[request.to_dict()],
                task_id=request.job_id,
                queue=q,
                routing_key=q,
                retry=False,
            )
        except Exception as exc:  # kombu's OperationalError, a socket error, a redis error
            raise _unavailable(self.settings.broker_url, exc) from exc
        # "queued" only once the message is on the queue: written before, a publish that failed
        # (Redis going down) left a job id that said "queued" for a day and never ran (found by
        # tests/test_soak.py). NX: a worker that was quicker has already written its status.
        # Best effort: the job is accepted now, and the worker writes its status anyway.
        with contextlib.suppress(redis.RedisError, OSError):
            r.set(status_key(request.job_id), QUEUED, ex=self.settings.result_ttl_s, nx=True)
        return request.job_id

    # ---- job state -------------------------------------------------------------------------
    def _stored(self, job_id: str) -> dict[str, Any] | None:
        raw = self._call(self._redis.get, result_key(job_id))
        return json.loads(raw) if raw is not None else None

    def status(self, job_id: str) -> dict[str, Any]:
        """{"job_id", "status": queued|running|<terminal>|unknown, "cancel_requested", ...};
        "note" says why, when the job was requeued after its worker was lost."""
        stored = self._stored(job_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(status_key(job_id))
        pipe.exists(cancel_key(job_id))
        pipe.get(runs_key(job_id))
        pipe.get(deliveries_key(job_id))
        pipe.get(note_key(job_id))
        raw_status, cancel, runs, deliveries, note = self._call(pipe.execute)
        if stored is not None:
            status = stored["status"]
        else:
            status = raw_status.decode() if raw_status else UNKNOWN
        out: dict[str, Any] = {
            "job_id": job_id,
            "status": status,
            "cancel_requested": bool(cancel),
            "deliveries": int(deliveries or 0),  # times a worker received it
            "runs": int(runs or 0),  # times it was handed to an Engine
        }
        if note is not None:
            out["note"] = note.decode()
        if stored is not None:
            out.update(usage=stored.get("usage", {}), error=stored.get("error"))
        return out

    def cancel(self, job_id: str) -> bool:
        """Ask for cancellation (running: between steps; queued: when a worker picks it up).
        Returns False when the job had already finished."""
        if self._stored(job_id) is not None:
            return False
        self._call(self._redis.set, cancel_key(job_id), "1", ex=self.settings.result_ttl_s)
        return True

    def completions(self, job_id: str) -> int:
        """How many runs of the job reached the end (1 for every finished job)."""
        return int(self._call(self._redis.get, completions_key(job_id)) or 0)

    def result(self, job_id: str, timeout: float | None = None) -> GenerationResult:
        """Wait for the stored result; `output_midi` (bytes) and long `output_text` are fetched
        back from their references. Raises ResultTimeout after `timeout` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            stored = self._stored(job_id)
            if stored is not None:
                return self._materialise(stored)
            if end is not None and time.monotonic() >= end:
                raise ResultTimeout(
                    f"job {job_id} has no result after {timeout}s", field="job_id", value=job_id
                )
            pause = delay if end is None else min(delay, max(0.0, end - time.monotonic()))
            time.sleep(pause)
            delay = min(delay * 1.5, 0.25)

    def _materialise(self, stored: dict[str, Any]) -> GenerationResult:
        out = dict(stored)
        text_ref = out.pop("output_text_ref", None)
        midi_ref = out.pop("output_midi_ref", None)
        if text_ref:
            data = self._call(self._redis.get, text_ref)
            if data is None:
                raise ResultMissing("the job's text has expired", field="output_text")
            out["output_text"] = data.decode()
        midi = b""
        if midi_ref:
            midi = self._call(self._redis.get, midi_ref)
            if midi is None:
                raise ResultMissing("the job's MIDI file has expired", field="output_midi")
        out["output_midi"] = midi
        return GenerationResult.from_wire(out)

    # ---- events ----------------------------------------------------------------------------
    def events(
        self,
        job_id: str,
        last_id: str = "0-0",
        block_ms: int = 1000,
        timeout: float | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(stream id, event) after `last_id`, in order, waiting for new ones; ends after the
        final event (at once if `last_id` is at or past it). Resume with the last id seen.
        `timeout`: give up (ResultTimeout) when no final event arrived within that many seconds."""
        key = events_key(job_id)
        block_ms = max(1, min(int(block_ms), MAX_BLOCK_MS))
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            reply = self._call(self._blocking.xread, {key: last_id}, count=256, block=block_ms)
            entries = reply[0][1] if reply else []
            for raw_id, fields in entries:
                last_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                event = decode_event(fields)
                yield last_id, event
                if event.get("type") == "final":
                    return
            if not entries:
                # the final event and the result are written atomically: a result with nothing
                # left to read means we are past the final event already
                if self._call(self._redis.exists, result_key(job_id)):
                    return
                if end is not None and time.monotonic() >= end:
                    raise ResultTimeout(
                        f"job {job_id}: no final event after {timeout}s", field="job_id"
                    )

    # ---- fleet -----------------------------------------------------------------------------
    def live_workers(self, model_name: str | None = None) -> list[dict[str, Any]]:
        """Workers whose heartbeat has not expired, for health checks."""
        name = model_name or self.settings.model_name
        keys = sorted(self._call(lambda: list(self._redis.scan_iter(worker_pattern(name)))))
        if not keys:
            return []
        values = self._call(self._redis.mget, keys)
        return [json.loads(v) for v in values if v is not None]

    def queue_length(self, model_name: str | None = None) -> int:
        return int(self._call(self._redis.llen, queue_name(model_name or self.settings.model_name)))


__all__ = ["BrokerUnavailable", "JobQueue", "QueueFullError", "ResultTimeout", "check_broker"]
