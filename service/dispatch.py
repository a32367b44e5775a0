"""Dispatchers: where the front end sends a job. One interface, two implementations.

- `LocalDispatcher` (no broker configured): an in-process Engine. torch is imported only here,
  lazily, when the model is loaded, so `import unmask.service.server` stays torch-free.
- `CeleryDispatcher` (service/celery_dispatch.py): a Celery task on the model's queue in Redis;
  progress comes back through the job's Redis Stream.

Progress events are the Engine's plain dicts (`accepted`, `step`, `block`); the last event is
always `{"type": "final", "result": GenerationResult}` (engine/result.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from unmask.engine.request import GenerationRequest
from unmask.engine.result import GenerationResult
from unmask.errors import NotFound, NotReady, UnmaskError
from unmask.settings import Settings

log = logging.getLogger("unmask.service")

MODALITIES = ("text", "code", "midi")
FORGET_AFTER_S = 60.0  # a finished streamed job stays readable this long
ENDED_KEPT = 10_000  # final statuses of forgotten streamed jobs kept for status() (~1 MB)


@dataclass
class ModelInfo:
    name: str
    ready: bool
    dispatcher: str
    live_workers: int = 0
    queue_length: int = 0
    max_seq_len: int = 0
    architecture: str = ""
    modalities: tuple[str, ...] = MODALITIES
    extra: dict[str, Any] = field(default_factory=dict)


class Dispatcher(ABC):
    kind = "abstract"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin loading / connecting; must return quickly (health says when it is ready)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    @property
    def default_model(self) -> str:
        return self.settings.model_name

    @abstractmethod
    async def check_model(self, name: str) -> None:
        """Raise NotFound for a model this dispatcher cannot serve."""

    @abstractmethod
    async def submit(self, request: GenerationRequest, *, events: bool = True) -> str:
        """Queue a job; returns its id. `events=False`: nobody will read its progress."""

    @abstractmethod
    def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Progress events of a job submitted with events=True, ending with the final one."""

    @abstractmethod
    async def cancel(self, job_id: str) -> None:
        pass

    @abstractmethod
    async def poll(self, job_id: str) -> GenerationResult | None:
        """The final result if the job has finished, else None (non-blocking)."""

    @abstractmethod
    async def models(self) -> list[ModelInfo]:
        pass

    @abstractmethod
    async def status(self, job_id: str) -> str:
        """queued | running | succeeded | failed | cancelled | deadline_exceeded | unknown"""

    async def note(self, job_id: str) -> str:
        """Why a job waits longer than usual (e.g. its worker was lost); "" when nothing did."""
        return ""

    async def ready(self) -> bool:
        """Serving: the default model can run jobs now."""
        return any(m.ready for m in await self.models() if m.name == self.default_model)

    async def wait(self, job_id: str) -> GenerationResult:
        """Follow a job's events to its final result."""
        async for event in self.events(job_id):
            if event.get("type") == "final":
                return event["result"]
        raise UnmaskError(f"job {job_id} ended without a result", field="job_id")


# ---- local -------------------------------------------------------------------------------


class _LocalJob:
    """A job in the in-process Engine and the thread that drains its events."""

    def __init__(
        self, handle: Any, loop: asyncio.AbstractEventLoop, with_events: bool, forget: Any
    ) -> None:
        self.handle = handle
        self._forget = forget  # drops the job from the dispatcher's table (events jobs only)
        self.queue: asyncio.Queue[dict[str, Any]] | None = asyncio.Queue() if with_events else None
        self._loop = loop
        self.pumped = False  # every event is in the queue (set on the loop)
        self.released = False  # no reader will come (any more): forget the job once it ends
        self.thread = threading.Thread(
            target=self._pump, name=f"unmask-job-{handle.job_id[:8]}", daemon=True
        )

    def _pump(self) -> None:
        for event in self.handle.events():
            if self.queue is not None:
                self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        if self.queue is not None:  # batch jobs (no queue) stay until poll() collects them
            self._loop.call_soon_threadsafe(self._forget_later)

    def _forget_later(self) -> None:
        self.pumped = True
        if self.released:
            self._forget(self.handle.job_id)
        else:  # the reader may not have started yet: keep the job a while after its end
            self._loop.call_later(FORGET_AFTER_S, self._forget, self.handle.job_id)

    def release(self) -> None:
        """No reader will come (any more): its reader left, or the job was cancelled (as a call
        that went away does, even before it read anything). Forget the job as soon as it has
        ended, not FORGET_AFTER_S later."""
        self.released = True
        if self.pumped:
            self._forget(self.handle.job_id)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class LocalDispatcher(Dispatcher):
    """The embedded Engine. Jobs and batch records live in this process's memory."""

    kind = "local"

    def __init__(self, settings: Settings, generator: Any = None) -> None:
        super().__init__(settings)
        self._generator = generator
        self._engine: Any = None
        self._load_error: BaseException | None = None
        self._loading: asyncio.Task | None = None
        self._jobs: dict[str, _LocalJob] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # job id -> final status, forgotten
        self._info: dict[str, Any] = {}

    async def start(self) -> None:
        self._loading = asyncio.create_task(self._load())

    async def wait_ready(self) -> None:
        if self._loading is not None:
            await self._loading
        if self._load_error is not None:
            raise NotReady(f"the model failed to load: {self._load_error}", field="model")

    async def _load(self) -> None:
        settings = self.settings

        def load() -> Any:
            from unmask.engine.engine import Engine
            from unmask.models.generation import Generator

            generator = self._generator
            if generator is None:
                generator = Generator.load(settings.model or None, resolve_device(settings.device))
            cfg = generator.model.config
            self._info = {
                "max_seq_len": int(cfg.max_seq_len),
                "architecture": "autoregressive" if generator.is_ar else "diffusion",
                "details": model_details(generator),
            }
            observer = None
            if settings.metrics_port:  # the Engine's numbers on the front end's /metrics
                from unmask.metrics import EngineMetrics

                observer = EngineMetrics()
            return Engine(generator, max_batch=settings.max_batch, max_queue=settings.max_queue,
                          observer=observer)  # fmt: skip

        try:
            engine = await asyncio.to_thread(load)
        except Exception as exc:  # shown by health (NOT_SERVING) and by every call
            log.exception("loading the model failed")
            self._load_error = exc
            return
        self._engine = engine.start()
        log.info("model %s ready (%s)", self.default_model, self._info.get("architecture"))

    async def close(self) -> None:
        if self._loading is not None and not self._loading.done():
            await asyncio.gather(self._loading, return_exceptions=True)
        for job in list(self._jobs.values()):
            job.handle.cancel()
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
            self._engine = None

    def _running(self) -> Any:
        if self._load_error is not None:
            raise NotReady(f"the model failed to load: {self._load_error}", field="model")
        if self._engine is None:
            raise NotReady("the model is still loading; try again shortly", field="model")
        return self._engine

    async def check_model(self, name: str) -> None:
        if name != self.default_model:
            raise NotFound(
                f"unknown model {name!r}; this server runs {self.default_model!r}",
                field="model", value=name,
            )  # fmt: skip

    async def submit(self, request: GenerationRequest, *, events: bool = True) -> str:
        await self.check_model(request.model)
        engine = self._running()
        handle = engine.submit(request)  # QueueFull when the Engine's queue is full
        job = _LocalJob(handle, asyncio.get_running_loop(), events, self._forget)
        self._jobs[handle.job_id] = job
        job.thread.start()
        return handle.job_id

    def _forget(self, job_id: str) -> None:
        """Drop a streamed job that has ended (its request, events and result); only its final
        status stays, for status(), among the last ENDED_KEPT."""
        job = self._jobs.pop(job_id, None)
        if job is None or not job.handle.done():
            return
        self._ended[job_id] = job.handle.result().status
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def _job(self, job_id: str) -> _LocalJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no such job {job_id!r}", field="job_id", value=job_id)
        return job

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        job = self._job(job_id)
        assert job.queue is not None, "submitted with events=False"
        try:
            while True:
                event = await job.queue.get()
                final = event.get("type") == "final"
                if final:
                    # forget the job (its request and result) before handing out the final
                    # event: a reader that stops there (Generate returns, an error is raised)
                    # may never resume this generator
                    self._jobs.pop(job_id, None)
                yield event
                if final:
                    return
        finally:  # the end, or a reader that went away (its call cancels the job)
            job.release()

    async def cancel(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.handle.cancel()
            if job.queue is not None:  # batch jobs (no queue) stay until poll() collects them
                job.release()

    async def poll(self, job_id: str) -> GenerationResult | None:
        job = self._jobs.get(job_id)
        if job is None or not job.handle.done():
            return None
        self._jobs.pop(job_id, None)
        return job.handle.result()

    async def status(self, job_id: str) -> str:
        job = self._jobs.get(job_id)
        if job is None:
            return self._ended.get(job_id, "unknown")
        if job.handle.done():
            return job.handle.result().status
        return "running"

    async def models(self) -> list[ModelInfo]:
        engine = self._engine
        # not ready (health NOT_SERVING) while the Engine's watchdog restarts its dead loop
        ready = engine is not None and engine.healthy
        details = self._info.get("details") or {}
        return [
            ModelInfo(
                name=self.default_model, ready=ready, dispatcher=self.kind,
                live_workers=1 if ready else 0,
                queue_length=engine.load if engine is not None else 0,
                max_seq_len=self._info.get("max_seq_len", 0),
                architecture=self._info.get("architecture", ""),
                modalities=tuple(details.get("modalities") or MODALITIES),
                extra={"details": details},
            )
        ]  # fmt: skip


def model_details(generator: Any) -> dict[str, Any]:
    """What ListModels / GetModel say about a loaded model (`Generator.describe`); {} for a
    stand-in generator without one (tests)."""
    describe = getattr(generator, "describe", None)
    return dict(describe()) if callable(describe) else {}


def make_dispatcher(settings: Settings, generator: Any = None) -> Dispatcher:
    """local without a broker, celery with one."""
    if settings.embedded:
        return LocalDispatcher(settings, generator)
    from unmask.service.celery_dispatch import CeleryDispatcher

    return CeleryDispatcher(settings)
