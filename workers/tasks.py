"""The worker side: one Celery task that feeds a process-wide Engine, plus worker liveness.

Pool choice: the worker runs Celery's **threads** pool. Every task thread submits its job to the
same process-wide Engine, whose loop batches the denoising steps of all active jobs into one
forward pass, so `--concurrency N` means "up to N jobs batched together on one model copy".
The prefork pool would give each child process its own copy of the model and its own Engine:
N times the memory, and no batching across jobs. A task thread only waits (on its job's
result and on Redis), so the GIL is not a bottleneck; the model runs on the Engine's thread.

The model is loaded once per worker process, after any fork, never in a parent: lazily under a
lock by the first task, and eagerly when the worker is ready (non-prefork pools) or in each
prefork child (`worker_process_init`). A pid check reloads it if a process forked after loading.
With `metrics_port` set, the process then serves /metrics (workers/metrics.py).

A task is thin: unpack the request → (finished already? cancelled or expired while queued? then
store without running) → submit to the Engine, whose events one relay thread per process sends to
the jobs' Redis Streams (`_EventRelay`) → store the result. Exactly once: the result is written
with SET NX inside one Lua script that also appends the final event, so a redelivered job that
already finished neither runs again nor stores a second result; `completions` counts the runs that
reached the end. Newest delivery wins: a run's number in the `deliveries` counter is its fencing
token, and a run overtaken by a newer delivery of its job (Celery hands a job out again when the
worker's broker connection drops mid-run) stops, appends no more events and stores nothing (see
_STORE_LUA). A run that loses Redis (connection refused, reset, timed out) stores nothing and goes
back to the queue (Celery `Reject(requeue=True)`; when kombu cannot reach Redis for that either,
the worker requeues it itself once Redis is back, see recovery.settle): a network blip must not
become a permanent "failed" result. The rerun appends to the same event stream.

Celery does not enforce time limits in the threads pool, so the task does: past the soft limit
the Engine ends the job between steps (failed, TimeLimitExceeded); a hard limit covers an Engine
that never finishes the job. The hard limit stays below the visibility timeout.

A worker that dies (kill -9, OOM, a native crash) leaves its jobs unacknowledged: every worker
claims the messages it receives and, after each heartbeat, requeues those of workers whose
heartbeat expired (recovery.py); each such requeue counts against the job, and a job whose
worker died on `max_deliveries` deliveries fails (WorkerLost) instead of killing the next one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, signals
from celery.exceptions import Reject
from kombu.asynchronous import get_event_loop

from unmask.engine.engine import Engine
from unmask.engine.request import GenerationRequest
from unmask.engine.result import GenerationResult
from unmask.errors import Cancelled, DeadlineExceeded, UnmaskError, error_dict
from unmask.metrics import EngineMetrics
from unmask.settings import Settings
from unmask.workers import metrics, recovery
from unmask.workers.celery_app import REDIS_LOSS_DELIVERIES
from unmask.workers.protocol import (
    CANCELLED,
    DEADLINE,
    FAILED,
    INLINE_LIMIT,
    RUNNING,
    TASK_NAME,
    WorkerLost,
    blob_key,
    cancel_key,
    completions_key,
    deliveries_key,
    encode_event,
    events_key,
    heartbeat_ttl,
    lost_key,
    result_key,
    runs_key,
    status_key,
    worker_key,
)

log = logging.getLogger("unmask.workers")

CANCEL_POLL_S = 0.1  # a job's cancel flag is read from Redis at most this often
# Redis unreachable (connection refused, reset or timed out): the job goes back to the queue
# instead of failing, up to REDIS_LOSS_DELIVERIES deliveries.
REDIS_LOST = (redis.ConnectionError, redis.TimeoutError)
# Test-only: a worker started with this variable set exits at once (a real crash, as an OOM kill
# would be) on a job whose prompt contains its value. Unset in every real deployment.
CRASH_MARKER_ENV = "UNMASK_TEST_CRASH_MARKER"
CRASH_EXIT_CODE = 86


class RedisLost(Exception):
    """Redis became unreachable while a job ran: not the job's fault, run it again."""


# Fencing: a run knows its delivery number (the `deliveries` counter it incremented). Once the
# job is delivered again while the run is still going (the worker lost its broker connection,
# so Celery handed the job out again), the older run is superseded: it may no longer append
# events or store anything, and it is not counted. Newest delivery wins.
#
# KEYS: result, completions, events, status, deliveries. ARGV: result JSON, ttl, final event
# JSON, maxlen, status, delivery. Returns -1 (superseded), 1 (stored) or 0 (a result was stored
# already). Every run that reaches the end unsuperseded counts itself; the first one stores.
_STORE_LUA = """
if tonumber(redis.call('GET', KEYS[5]) or '0') > tonumber(ARGV[6]) then
  return -1
end
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: events, deliveries. ARGV: event JSON, maxlen, ttl, delivery. 0: superseded, not added.
_EVENT_LUA = """
if tonumber(redis.call('GET', KEYS[2]) or '0') > tonumber(ARGV[4]) then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


DELIVERY_KEY = "unmask_delivery"  # set on each received request: its run's `task.request` has it


@dataclasses.dataclass
class _Delivery:
    """One message this process received. Its tag alone does not name it: kombu restores a
    message under the same tag, so a new delivery of it can arrive while this one still runs."""

    tag: str
    job_id: str
    claim: recovery.Held | None  # as written; None while it could not be
    message: Any  # kombu's Message: its channel counts it against the prefetch limit
    requeue: bool = False  # (ended runs) the run gave the message back, else Celery acks it


class _WorkerState:
    """What one worker process owns: settings, a Redis client, the Engine, the heartbeat."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.hostname = ""
        self.pool = "threads"
        self.lock = threading.Lock()
        self.engine: Engine | None = None
        self.engine_pid = 0
        self.device = ""
        self.load_seconds = 0.0  # how long loading the model took
        self.details: dict[str, Any] = {}  # the model's description (ListModels), heartbeat
        self.exporter: Any = None  # /metrics (settings.metrics_port), one per process
        self.exporter_pid = 0
        self.redis: redis.Redis | None = None
        self.redis_pid = 0
        self.store_script: Any = None
        self.event_script: Any = None
        self.heartbeat_stop: threading.Event | None = None
        self.heartbeat_thread: threading.Thread | None = None
        self.started_at = time.time()
        self.instance = uuid.uuid4().hex[:12]  # this process, even under a reused hostname
        # the deliveries this process holds (claims: recovery.py), and those whose run ended
        # while Redis was away, to settle once it is back; both by DELIVERY_KEY
        self.claims_lock = threading.Lock()
        self.claimed: dict[str, _Delivery] = {}
        self.unsettled: dict[str, _Delivery] = {}
        self.crash_marker = ""  # test-only, see CRASH_MARKER_ENV


_state = _WorkerState()


def configure(app: Celery, settings: Settings, *, hostname: str) -> Any:
    """Bind the settings to this process and register the task on `app`."""
    _state.settings = settings
    _state.hostname = hostname
    _state.pool = str(app.conf.worker_pool or "threads")
    _state.crash_marker = os.environ.get(CRASH_MARKER_ENV, "")
    if _state.crash_marker:
        log.warning("%s is set: this worker crashes on marked jobs (tests only)", CRASH_MARKER_ENV)
    signals.worker_process_init.connect(_on_process_init, weak=False, dispatch_uid="unmask-init")
    signals.worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid="unmask-ready")
    signals.worker_shutdown.connect(_on_shutdown, weak=False, dispatch_uid="unmask-shutdown")
    signals.task_received.connect(_on_task_received, weak=False, dispatch_uid="unmask-claim")
    # acks and redelivery are configured once, on the app (celery_app.py)
    return app.task(name=TASK_NAME, bind=True, ignore_result=False)(_generate_task)


def _settings() -> Settings:
    if _state.settings is None:
        raise RuntimeError("unmask.workers.tasks.configure() was not called")
    return _state.settings


def _redis() -> redis.Redis:
    with _state.lock:
        if _state.redis is None or _state.redis_pid != os.getpid():
            _state.redis = redis.Redis.from_url(
                _settings().broker_url, socket_connect_timeout=2.0, socket_timeout=10.0
            )
            _state.store_script = _state.redis.register_script(_STORE_LUA)
            _state.event_script = _state.redis.register_script(_EVENT_LUA)
            _state.redis_pid = os.getpid()
        return _state.redis


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def get_engine() -> Engine:
    """The process-wide Engine, loading the model on first use in this process."""
    with _state.lock:
        if _state.engine is None or _state.engine_pid != os.getpid():
            from unmask.models.generation import Generator

            s = _settings()
            device = _resolve_device(s.device)
            t0 = time.perf_counter()
            generator = Generator.load(s.model or None, device=device)
            _state.details = generator.describe()  # ListModels, via the heartbeat
            engine = Engine(
                generator,
                max_batch=s.max_batch,
                max_queue=s.worker_concurrency + s.max_batch,
                observer=EngineMetrics() if s.metrics_port else None,
            )
            _state.engine = engine.start()
            _state.engine_pid = os.getpid()
            _state.device = device
            _state.load_seconds = time.perf_counter() - t0
            log.info(
                "model %s (%s) loaded on %s in %.2fs, pid %d",
                s.model_name,
                s.model or "shipped default",
                device,
                _state.load_seconds,
                os.getpid(),
            )
        return _state.engine


# ---- lifecycle signals ----------------------------------------------------------------------
def _init_process() -> None:
    get_engine()
    _start_metrics()  # before the heartbeat: a live worker already serves /metrics
    _start_heartbeat()


def _start_metrics() -> None:
    """This process's /metrics exporter, once the model has loaded (settings.metrics_port)."""
    s = _settings()
    if not s.metrics_port or _state.exporter_pid == os.getpid():
        return
    _state.exporter_pid = os.getpid()
    engine = _state.engine
    try:
        _state.exporter = metrics.start(
            s, device=_state.device, load_seconds=_state.load_seconds,
            engine_load=lambda: engine.load if engine is not None else 0,
        )  # fmt: skip
    except UnmaskError as exc:  # the port was free at start-up (cli.py); jobs still run
        log.error("no metrics: %s", exc)


def _on_process_init(**_: Any) -> None:  # a prefork child, after the fork
    _init_process()


def _on_worker_ready(**_: Any) -> None:  # the worker process itself (threads / solo pools)
    if _state.pool != "prefork":
        _init_process()


def _on_shutdown(**_: Any) -> None:
    stop = _state.heartbeat_stop
    if stop is not None:
        stop.set()
        _catch_up()  # runs that ended while Redis was away
        try:
            # reserved jobs that never started went back to the queue when Celery closed its
            # connection: drop their claims, so that no sweep mistakes them for lost ones
            recovery.release(_redis(), _owner(), _take_claims())
            _redis().delete(worker_key(_settings().model_name, _state.hostname))
        except redis.RedisError:
            pass
    if _state.exporter is not None:
        _state.exporter.close()
        _state.exporter = None
    if _state.engine is not None:
        _state.engine.close()


# ---- claims on delivered messages (recovery.py) ---------------------------------------------
def _owner() -> recovery.Owner:
    return recovery.Owner(_settings().model_name, _state.hostname, _state.instance)


def _on_task_received(request: Any = None, **_: Any) -> None:
    """Runs on the consumer thread when a message arrives, before its task is started."""
    if request is None or request.name != TASK_NAME:
        return
    tag = str(request.message.delivery_tag)
    try:
        held = recovery.claim(_redis(), _owner(), tag, request.id)
    except redis.RedisError as exc:  # the next heartbeat that reaches Redis writes it
        log.warning("job %s: could not claim delivery %s yet: %s", request.id, tag, exc)
        held = None
    key = uuid.uuid4().hex
    request.request_dict[DELIVERY_KEY] = key  # becomes task.request.unmask_delivery
    with _state.claims_lock:  # before the run starts, so before _end_delivery
        _state.claimed[key] = _Delivery(tag, request.id, held, request.message)


def _end_delivery(key: str | None, requeue: bool) -> None:
    """The run of delivery `key` ended: release its claim. Left to the next heartbeat that
    reaches Redis (_catch_up, recovery.settle) instead: a run that gives its message back
    (kombu's reject comes after this and fails silently while Redis is away), a run whose
    message arrived on a channel that has closed since (the broker connection was lost: kombu's
    ack may fail), and a release that fails."""
    with _state.claims_lock:
        d = _state.claimed.pop(key or "", None)
    if d is None:
        return
    d.requeue = requeue
    if not requeue and not getattr(getattr(d.message, "channel", None), "closed", False):
        try:
            if d.claim is not None:
                recovery.release(_redis(), _owner(), {d.tag: d.claim})
            return
        except redis.RedisError as exc:
            log.warning("could not release delivery %s yet: %s", d.tag, exc)
    with _state.claims_lock:
        _state.unsettled[key or ""] = d


def _forget_delivery(message: Any) -> None:
    """settle() moved or dropped the message of a delivery whose reject or ack failed in kombu:
    acknowledge the old tag on its channel too, on the consumer's event loop as Celery does,
    or that channel keeps counting the delivery against its prefetch limit and stops taking
    messages once all its slots are such ghosts. A closed channel took its count with it."""
    channel = getattr(message, "channel", None)
    if message is None or message.acknowledged or channel is None or channel.closed:
        return
    hub = get_event_loop()
    if hub is not None:
        hub.call_soon(functools.partial(_ack_quietly, message))
    else:
        _ack_quietly(message)


def _ack_quietly(message: Any) -> None:
    """On the event loop: kombu's reject may have run (and worked) since; never raise there."""
    if message.acknowledged:
        return
    try:
        message.ack()
    except Exception as exc:
        log.warning("could not acknowledge delivery %s locally: %s", message.delivery_tag, exc)


def _take_claims() -> dict[str, recovery.Held]:
    with _state.claims_lock:
        held = {d.tag: d.claim for d in _state.claimed.values() if d.claim is not None}
        _state.claimed.clear()
    return held


def _catch_up() -> None:
    """After each heartbeat that reached Redis: write the claims that failed, then settle the
    deliveries that ended while Redis was away (a message given back while kombu could not
    reach Redis stays unacknowledged until the visibility timeout otherwise). Never raises."""
    with _state.claims_lock:
        if not _state.unsettled and all(d.claim for d in _state.claimed.values()):
            return  # the usual case: nothing to catch up with
    try:
        r, me, ttl = _redis(), _owner(), _settings().result_ttl_s
        with _state.claims_lock:  # a run that ends meanwhile waits: no claim outlives its run
            for d in _state.claimed.values():
                if d.claim is None:
                    d.claim = recovery.claim(r, me, d.tag, d.job_id)
            unsettled = list(_state.unsettled.items())
        for key, d in unsettled:
            if recovery.settle(r, me, d.tag, d.job_id, d.claim, d.requeue, ttl):
                _forget_delivery(d.message)
            with _state.claims_lock:
                _state.unsettled.pop(key, None)
    except redis.RedisError as exc:
        log.warning("catching up with Redis failed: %s", exc)
    except Exception:
        log.exception("catching up with Redis failed")


def _sweep_lost_workers() -> None:
    """After each heartbeat. Never raises: a dead heartbeat thread would make us look lost."""
    try:
        for job_id in recovery.sweep(_redis(), _owner(), _settings().result_ttl_s):
            log.info("job %s: back on the queue, its worker was lost", job_id)
    except redis.RedisError as exc:
        log.warning("sweep for lost workers failed: %s", exc)
    except Exception:
        log.exception("sweep for lost workers failed")


def _heartbeat_info() -> dict[str, Any]:
    s = _settings()
    engine = _state.engine
    return {
        "hostname": _state.hostname,
        "pid": os.getpid(),
        "model_name": s.model_name,
        "model": s.model,
        "device": _state.device or s.device,
        "details": _state.details,
        "concurrency": s.worker_concurrency,
        "max_batch": s.max_batch,
        "load": engine.load if engine is not None else 0,
        "started_at": _state.started_at,
        "instance": _state.instance,
        "ts": time.time(),
    }


def _start_heartbeat() -> None:
    if _state.heartbeat_thread is not None and _state.heartbeat_thread.is_alive():
        return
    s = _settings()
    key = worker_key(s.model_name, _state.hostname)
    ttl = heartbeat_ttl(s.heartbeat_s)
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            engine = _state.engine
            alive = engine is not None and engine._thread is not None and engine._thread.is_alive()
            try:
                if alive:
                    _redis().set(key, json.dumps(_heartbeat_info()), ex=ttl)
                    _catch_up()
                    _sweep_lost_workers()
                else:
                    _redis().delete(key)
            except redis.RedisError as exc:
                log.warning("heartbeat to Redis failed: %s", exc)
            stop.wait(s.heartbeat_s)

    _state.heartbeat_stop = stop
    _state.heartbeat_thread = threading.Thread(target=beat, name="unmask-heartbeat", daemon=True)
    _state.heartbeat_thread.start()


# ---- the task -------------------------------------------------------------------------------
class _CancelCheck:
    """`should_cancel` for the Engine: the job's Redis flag, or a newer delivery of the job (both
    read by the process's `_CancelPoller`, not here), or the soft time limit. Runs on the
    Engine's thread between steps, so it does no I/O: a slow Redis never stalls a step."""

    def __init__(self, job_id: str, soft_deadline: float, delivery: int) -> None:
        self.key = cancel_key(job_id)
        self.deliveries = deliveries_key(job_id)
        self.delivery = delivery
        self.soft_deadline = soft_deadline
        self.cancelled = False
        self.superseded = False
        self.timed_out = False

    def __call__(self) -> bool:
        if time.monotonic() > self.soft_deadline:
            self.timed_out = True
            return True
        return self.cancelled or self.superseded

    def update(self, cancelled: Any, deliveries: Any) -> None:
        self.cancelled = self.cancelled or bool(cancelled)
        self.superseded = self.superseded or int(deliveries or 0) > self.delivery


class _CancelPoller:
    """One thread per worker process reads every running job's cancel flag and delivery count
    in one pipeline every CANCEL_POLL_S (instead of one round trip per job on the Engine's
    thread: 32 jobs were 320 round trips a second there)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checks: set[_CancelCheck] = set()
        self._pid = 0

    def watch(self, check: _CancelCheck) -> None:
        with self._lock:
            self._checks.add(check)
            if self._pid != os.getpid():  # first use in this process (after any fork)
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="unmask-cancel-poll", daemon=True).start()

    def forget(self, check: _CancelCheck) -> None:
        with self._lock:
            self._checks.discard(check)

    def _run(self) -> None:
        while True:
            time.sleep(CANCEL_POLL_S)
            with self._lock:
                checks = [c for c in self._checks if not (c.cancelled or c.superseded)]
            if not checks:
                continue
            try:
                pipe = _redis().pipeline(transaction=False)
                for c in checks:
                    pipe.exists(c.key)
                    pipe.get(c.deliveries)
                replies = pipe.execute()
                for i, c in enumerate(checks):
                    c.update(replies[2 * i], replies[2 * i + 1])
            except redis.RedisError:  # Redis hiccup: keep the jobs running, look again later
                continue
            except Exception:  # a bug here must not end the polling of every later job
                log.exception("reading the cancel flags failed")


_cancel_poller = _CancelPoller()

RELAY_BATCH = 512  # events sent in one pipeline at most
RELAY_FLUSH_S = 30.0  # a finished job waits this long for its last events to be relayed


class _Relayed:
    """One run's events on their way to its stream (`_EventRelay`), and what became of them."""

    def __init__(self, job_id: str, delivery: int) -> None:
        self.keys = [events_key(job_id), deliveries_key(job_id)]
        self.delivery = delivery
        self.handle: Any = None  # the Engine's JobHandle, once submitted
        self.superseded = False  # a newer delivery of the job exists: nothing more is added
        self.error: Exception | None = None  # relaying failed (Redis lost): the run stops
        self.flushed = threading.Event()  # every event before the final one was relayed
        self.stopped = False

    def attach(self, handle: Any) -> None:
        """The run's job, once submitted (a run stopped before that is cancelled now)."""
        self.handle = handle
        if self.stopped:
            handle.cancel()

    def stop(self, error: Exception | None = None) -> None:
        """No more events for this run (`error`: why, the first one stands): end its job in the
        Engine too."""
        self.error = self.error or error
        self.stopped = True
        if self.handle is not None:
            self.handle.cancel()


class _EventRelay:
    """One thread per worker process relays every running job's events to their Redis Streams:
    whatever is waiting goes out in one pipeline, so a step of 32 streamed jobs costs one round
    trip instead of 32, made by 32 task threads that shared the GIL with the Engine's thread.
    Events of one job stay in order (one FIFO queue); a job's final event is not relayed (the
    stored result appends it) but marks its earlier events as sent."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[_Relayed, dict]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pid = 0

    def sink(self, relayed: _Relayed) -> Callable[[dict], None]:
        """`Engine.submit(on_event=...)` for one run."""
        with self._lock:
            if self._pid != os.getpid():  # first use in this process (after any fork)
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="unmask-event-relay", daemon=True).start()
        return lambda event: self._queue.put((relayed, event))

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < RELAY_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._send(batch)
            except Exception:  # a bug here must not end the relaying of every later job
                log.exception("relaying events failed")
                for relayed, _ in batch:
                    relayed.stop(RuntimeError("relaying events failed"))
            for relayed, event in batch:
                if event.get("type") == "final":
                    relayed.flushed.set()

    def _send(self, batch: list[tuple[_Relayed, dict]]) -> None:
        s = _settings()
        sends = [(relayed, encode_event(event)["data"]) for relayed, event in batch
                 if event.get("type") != "final" and not relayed.stopped]  # fmt: skip
        if not sends:
            return
        try:
            replies = self._append(sends, s)
        except redis.RedisError as exc:  # Redis lost: those runs stop and go back to the queue
            for relayed, _ in sends:
                relayed.stop(exc)
            return
        for (relayed, _), added in zip(sends, replies, strict=True):
            if not added and not relayed.superseded:
                relayed.superseded = True
                relayed.stop()

    @staticmethod
    def _append(sends: list[tuple[_Relayed, str]], s: Settings) -> list[Any]:
        """The event script for every event, in one pipeline of EVALSHA calls. Not
        `Script.__call__` on the pipeline: redis-py then asks SCRIPT EXISTS before every
        execute, a second round trip per batch that took a third of this thread's time in a
        streamed 32-request wave. A Redis that lacks the script (new, restarted, flushed) gets
        it, and only the events it refused are sent again."""
        script = _state.event_script
        assert script is not None

        def run(indices: list[int]) -> list[Any]:
            pipe = _redis().pipeline(transaction=False)
            for i in indices:
                relayed, data = sends[i]
                pipe.evalsha(script.sha, len(relayed.keys), *relayed.keys, data,
                             s.stream_maxlen, s.result_ttl_s, relayed.delivery)  # fmt: skip
            return pipe.execute(raise_on_error=False)

        replies = run(list(range(len(sends))))
        refused = [
            i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)
        ]
        if refused:
            _redis().script_load(_EVENT_LUA)
            for i, reply in zip(refused, run(refused), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies


_event_relay = _EventRelay()


def _generate_task(task: Any, request: dict[str, Any]) -> dict[str, Any]:
    requeue = False
    try:
        return run_job(task.request.id, request)
    except RedisLost as exc:
        # Back to the head of the queue now. If the broker is unreachable too, kombu's reject
        # fails (it only logs "Couldn't reject") and the message stays unacknowledged: the
        # heartbeat requeues it once Redis answers again (_catch_up). Either way the job runs
        # again and stores its result once.
        requeue = True
        raise Reject(str(exc), requeue=True) from exc
    finally:
        _end_delivery(getattr(task.request, DELIVERY_KEY, None), requeue)


def run_job(job_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run one job (idempotently) and store its result; returns a small summary dict.

    Raises RedisLost when Redis became unreachable: the job is not at fault, so no failure is
    stored for it (that would turn a network blip into a permanent result); it runs again."""
    try:
        r = _redis()
        pipe = r.pipeline(transaction=False)
        pipe.incr(deliveries_key(job_id))
        pipe.expire(deliveries_key(job_id), _settings().result_ttl_s)
        pipe.get(result_key(job_id))
        pipe.get(lost_key(job_id))
        delivery, _, existing, lost = pipe.execute()
    except REDIS_LOST as exc:
        raise RedisLost(f"job {job_id}: Redis unreachable before the run ({exc})") from exc
    if existing is not None:  # a redelivery or resubmission of a finished job
        status = json.loads(existing).get("status")
        log.info("job %s already finished (%s): not run again", job_id, status)
        return _summary(job_id, status, stored=False)
    model = str(request.get("model", "")) if isinstance(request, dict) else ""
    delivery = int(delivery)
    if int(lost or 0) >= _settings().max_deliveries:  # a poison pill: it must not kill us too
        message = f"failed after {int(lost)} deliveries; the worker died each time"
        log.error("job %s %s: not run again", job_id, message)
        return _store_or_requeue(r, job_id, model, WorkerLost(message), delivery)
    try:
        return _run(r, job_id, request, delivery)
    except REDIS_LOST as exc:
        if delivery < REDIS_LOSS_DELIVERIES:
            log.warning("job %s: lost Redis mid-run (%s); it goes back to the queue", job_id, exc)
            raise RedisLost(f"job {job_id}: Redis unreachable mid-run ({exc})") from exc
        log.error("job %s: lost Redis in %d deliveries; giving up", job_id, delivery)
        return _store_or_requeue(r, job_id, model, exc, delivery)
    except Exception as exc:  # a bug must still end the job visibly
        log.exception("job %s failed in the worker", job_id)
        return _store_or_requeue(r, job_id, model, exc, delivery)


def _store_or_requeue(
    r: redis.Redis, job_id: str, model: str, exc: Exception, delivery: int
) -> dict[str, Any]:
    try:
        return _store(r, _failed(job_id, exc), delivery, model=model)
    except REDIS_LOST as lost:
        raise RedisLost(f"job {job_id}: Redis unreachable storing its failure ({lost})") from lost


def _run(r: redis.Redis, job_id: str, request: dict[str, Any], delivery: int) -> dict[str, Any]:
    s = _settings()
    model = str(request.get("model", "")) if isinstance(request, dict) else ""
    try:
        req = GenerationRequest.from_dict(request)
    except UnmaskError as exc:
        return _store(r, _failed(job_id, exc), delivery, model=model)
    if req.job_id != job_id:  # the Celery task id is the job id
        req = dataclasses.replace(req, job_id=job_id)
    if r.exists(cancel_key(job_id)):
        cancelled = Cancelled("job cancelled while queued")
        return _store(r, _failed(job_id, cancelled, CANCELLED), delivery, model=req.model)
    if req.deadline is not None and time.time() > req.deadline:
        expired = DeadlineExceeded("the job's deadline passed while it was queued")
        return _store(r, _failed(job_id, expired, DEADLINE), delivery, model=req.model)

    ttl = s.result_ttl_s
    pipe = r.pipeline(transaction=False)
    pipe.set(status_key(job_id), RUNNING, ex=ttl)
    pipe.incr(runs_key(job_id))
    pipe.expire(runs_key(job_id), ttl)
    pipe.execute()

    _crash_if_marked(req)
    check = _CancelCheck(job_id, time.monotonic() + s.task_soft_time_limit_s, delivery)
    _cancel_poller.watch(check)
    try:
        return _follow(r, job_id, req, delivery, check)
    finally:
        _cancel_poller.forget(check)


def _follow(
    r: redis.Redis, job_id: str, req: GenerationRequest, delivery: int, check: _CancelCheck
) -> dict[str, Any]:
    """Run the job on the Engine, its events relayed to the job's stream, store its result."""
    s = _settings()
    relayed = _Relayed(job_id, delivery)
    handle = get_engine().submit(req, should_cancel=check, on_event=_event_relay.sink(relayed))
    relayed.attach(handle)
    try:
        result = handle.result(timeout=s.task_time_limit_s)
    except TimeoutError:  # no result within the hard limit: the Engine is stuck, give up
        handle.cancel()
        return _store(r, _failed(job_id, _time_limit_error(hard=True)), delivery, model=req.model)
    if not relayed.flushed.wait(RELAY_FLUSH_S):
        log.error("job %s: its events were not all relayed in %ss", job_id, RELAY_FLUSH_S)
    if relayed.error is not None:
        raise relayed.error
    if relayed.superseded or check.superseded:
        return _superseded(job_id)
    if result.status == CANCELLED and check.timed_out and not check.cancelled:
        timed_out = _failed(job_id, _time_limit_error())
        timed_out.usage = result.usage
        return _store(r, timed_out, delivery, model=req.model)
    return _store(r, result, delivery, model=req.model)


def _crash_if_marked(req: GenerationRequest) -> None:
    """Test-only (CRASH_MARKER_ENV): die like a native crash would, mid-run, no cleanup."""
    marker = _state.crash_marker
    if marker and marker in req.prompt:
        log.error("job %s carries the test crash marker: exiting now", req.job_id)
        logging.shutdown()
        os._exit(CRASH_EXIT_CODE)


def _superseded(job_id: str) -> dict[str, Any]:
    log.warning("job %s: delivered again while this run went on; this run stops", job_id)
    return _summary(job_id, None, stored=False)


class TimeLimitExceeded(DeadlineExceeded):
    """The job ran past the worker's time limit (soft: checked between steps; hard: no event
    for that long)."""


def _time_limit_error(hard: bool = False) -> TimeLimitExceeded:
    s = _settings()
    limit = s.task_time_limit_s if hard else s.task_soft_time_limit_s
    kind = "hard" if hard else "soft"
    return TimeLimitExceeded(f"the job ran past the worker's {kind} time limit of {limit}s")


def _failed(job_id: str, exc: BaseException, status: str = FAILED) -> GenerationResult:
    return GenerationResult(job_id, status, error=error_dict(exc))


def _store(
    r: redis.Redis, result: GenerationResult, delivery: int, *, model: str = ""
) -> dict[str, Any]:
    """Write payloads by reference, then (atomically) the result + final event: first run wins,
    unless a newer delivery of the job superseded this run (then nothing is stored). The stored
    document is the result's wire form with the MIDI file (and a long text) by reference."""
    s = _settings()
    ttl = s.result_ttl_s
    job_id, status, text, midi = (
        result.job_id,
        result.status,
        result.output_text,
        result.output_midi,
    )
    attempt = uuid.uuid4().hex[:12]  # blobs of a losing duplicate run never overwrite the winner's
    doc: dict[str, Any] = {
        **result.to_wire(),
        "output_text": "",
        "output_midi_b64": "",
        "output_text_ref": None,
        "output_text_size": 0,
        "output_midi_ref": None,
        "output_midi_size": len(midi),
        "model": model,
        "worker": _state.hostname,
        "finished_at": time.time(),
    }
    blobs = []
    encoded = text.encode()
    doc["output_text_size"] = len(encoded)
    if len(encoded) > INLINE_LIMIT:
        blobs.append((blob_key(job_id, attempt, "text"), encoded))
        doc["output_text_ref"] = blobs[-1][0]
    else:
        doc["output_text"] = text
    if midi:
        blobs.append((blob_key(job_id, attempt, "midi"), midi))
        doc["output_midi_ref"] = blobs[-1][0]
    if blobs:
        pipe = r.pipeline(transaction=False)
        for key, data in blobs:
            pipe.set(key, data, ex=ttl)
        pipe.execute()
    payload = json.dumps(doc, separators=(",", ":"))
    final = json.dumps({"type": "final", **doc}, separators=(",", ":"))
    assert _state.store_script is not None
    outcome = int(
        _state.store_script(
            keys=[result_key(job_id), completions_key(job_id), events_key(job_id),
                  status_key(job_id), deliveries_key(job_id)],
            args=[payload, ttl, final, s.stream_maxlen, status, delivery],
        )
    )  # fmt: skip
    stored = outcome == 1
    if not stored:
        if outcome < 0:
            log.warning("job %s: delivered again while this run went on; result dropped", job_id)
        else:
            log.warning("job %s: a result was stored already; this run's result is dropped", job_id)
        if blobs:
            r.delete(*(k for k, _ in blobs))
    return _summary(job_id, status, stored=stored)


def _summary(job_id: str, status: str | None, *, stored: bool) -> dict[str, Any]:
    return {"job_id": job_id, "status": status, "stored": stored, "result_key": result_key(job_id)}
