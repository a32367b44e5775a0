"""The Engine: one thread owns the model and runs denoising steps for many jobs at once.

Loop: admit queued jobs (up to `max_batch`) → retire cancelled / expired ones → run ONE
denoising step for every active diffusion job as one batched forward pass (windows padded, the
padding masked both ways) → let each job's sampler commit/remask → publish events → retire
finished jobs. Jobs join and leave between steps (continuous batching at the step level).
The autoregressive baseline has no canvas to batch; its jobs run one at a time in the loop.

The Engine knows nothing of Celery, Redis or gRPC: `submit()` returns a `JobHandle` with an
event iterator, the final result and `cancel()`; the worker and the local dispatcher wrap it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from unmask.engine.request import GenerationRequest
from unmask.errors import UnmaskError
from unmask.models.block_sampler import new_state
from unmask.models.generation import Generation, Generator, Prepared
from unmask.models.sampler import (
    SamplerState,
    StepEvent,
    collate_inputs,
    run_batch,
    split_outputs,
)
from unmask.tokenizers.specials import NUM_SPECIAL

log = logging.getLogger("unmask.engine")

# Terminal statuses of a job (the service maps them to gRPC codes).
SUCCEEDED, FAILED, CANCELLED, DEADLINE = "succeeded", "failed", "cancelled", "deadline_exceeded"


class QueueFull(UnmaskError):
    """The Engine's admission queue is full: back-pressure, try again later."""


@dataclass
class JobResult:
    job_id: str
    status: str  # succeeded | failed | cancelled | deadline_exceeded
    output_text: str = ""
    output_midi: bytes = b""
    usage: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # {"type", "field", "message"} when failed

    def to_dict(self) -> dict[str, Any]:
        import base64

        d = {k: v for k, v in self.__dict__.items() if k != "output_midi"}
        d["output_midi_b64"] = base64.b64encode(self.output_midi).decode()
        return d


class JobHandle:
    """The caller's side of a job: events as they happen, the result, cancellation."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.job_id = request.job_id
        self._events: queue.Queue[dict | None] = queue.Queue()
        self._done = threading.Event()
        self._result: JobResult | None = None
        self.cancel_requested = threading.Event()

    def cancel(self) -> None:
        self.cancel_requested.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> JobResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.job_id} still running after {timeout}s")
        assert self._result is not None
        return self._result

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """Events in order; ends after the final event."""
        while True:
            ev = self._events.get(timeout=timeout)
            if ev is None:
                return
            yield ev

    # engine side
    def _emit(self, event: dict) -> None:
        self._events.put(event)

    def _resolve(self, result: JobResult) -> None:
        self._result = result
        self._emit({"type": "final", **result.to_dict()})
        self._events.put(None)
        self._done.set()


@dataclass
class _Active:
    handle: JobHandle
    job: Prepared
    state: SamplerState | None  # None: an AR job, run whole
    started: float
    should_cancel: Callable[[], bool] | None = None


class Engine:
    def __init__(
        self,
        generator: Generator,
        *,
        max_batch: int = 16,
        max_queue: int = 1024,
        batching: bool = True,
    ) -> None:
        self.generator = generator
        self.max_batch = max_batch if batching else 1
        self.max_queue = max_queue
        self._queue: deque[tuple[JobHandle, Callable[[], bool] | None]] = deque()
        self._active: list[_Active] = []
        self._lock = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.forward_passes = 0  # batched forwards (one per engine step)
        self.rows_run = 0  # job-steps executed (sum of batch sizes)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="unmask-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def load(self) -> int:
        with self._lock:
            return len(self._queue) + len(self._active)

    # ---- API -------------------------------------------------------------------------------
    def submit(
        self, request: GenerationRequest, should_cancel: Callable[[], bool] | None = None
    ) -> JobHandle:
        """Queue a job. `should_cancel` is polled between steps (e.g. a flag in Redis)."""
        handle = JobHandle(request)
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the engine queue is full ({self.max_queue} jobs)", field="queue")
            self._queue.append((handle, should_cancel))
            self._lock.notify_all()
        handle._emit({"type": "accepted", "job_id": handle.job_id})
        return handle

    def run_one(self, request: GenerationRequest) -> JobResult:
        return self.submit(request).result()

    # ---- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stop and not self._queue and not self._active:
                    self._lock.wait()
                if self._stop:
                    break
                admitted = []
                while self._queue and len(self._active) + len(admitted) < self.max_batch:
                    admitted.append(self._queue.popleft())
            for handle, should_cancel in admitted:
                self._admit(handle, should_cancel)
            self._retire_interrupted()
            try:
                self._step()
            except Exception as exc:  # a bug must fail the jobs, not kill the loop
                log.exception("engine step failed")
                for a in list(self._active):
                    self._fail(a, exc)
        for a in list(self._active):
            self._end(a, CANCELLED, error={"type": "Shutdown", "message": "engine closed"})
        while self._queue:
            handle, _ = self._queue.popleft()
            handle._resolve(JobResult(handle.job_id, CANCELLED, error={"message": "engine closed"}))

    def _admit(self, handle: JobHandle, should_cancel) -> None:
        try:
            job = self.generator.prepare(handle.request)
            state = None
            if job.canvas is not None:
                state = new_state(
                    self.generator.model,
                    job.canvas,
                    job.params,
                    self.generator.sampler_vocab,
                    device=self._device,
                )
        except UnmaskError as exc:
            handle._resolve(JobResult(handle.job_id, FAILED, error=_error(exc)))
            return
        self._active.append(_Active(handle, job, state, time.perf_counter(), should_cancel))

    @property
    def _device(self) -> torch.device:
        return next(self.generator.model.parameters()).device

    def _retire_interrupted(self) -> None:
        now = time.time()
        for a in list(self._active):
            deadline = a.handle.request.deadline
            if a.handle.cancel_requested.is_set() or (a.should_cancel and a.should_cancel()):
                self._end(a, CANCELLED, error={"type": "Cancelled", "message": "job cancelled"})
            elif deadline is not None and now > deadline:
                self._end(a, DEADLINE, error={"type": "DeadlineExceeded",
                                              "message": "the job's deadline passed"})  # fmt: skip

    def _step(self) -> None:
        diffusion = [a for a in self._active if a.state is not None]
        ar_jobs = [a for a in self._active if a.state is None]
        if ar_jobs:
            a = ar_jobs[0]  # the AR baseline: one whole job per loop turn
            try:
                gen = self.generator.run(a.job, on_step=lambda ev: _emit_step(a, ev))
            except UnmaskError as exc:
                self._fail(a, exc)
            else:
                self._succeed(a, gen)
        if not diffusion:
            return
        states = [a.state for a in diffusion]
        inputs = [s.prepare_inputs() for s in states]  # type: ignore[union-attr]
        batch = collate_inputs(inputs, self.generator.vocab.pad_id)
        logits, cache = run_batch(self.generator.model, batch)
        self.forward_passes += 1
        self.rows_run += len(diffusion)
        for a, (row_logits, row_cache) in zip(
            diffusion, split_outputs(batch, logits, cache), strict=True
        ):
            state = a.state
            assert state is not None
            block_before = state.block
            block_pos = state.blocks[block_before]
            try:
                event = state.advance(row_logits, row_cache)
            except UnmaskError as exc:
                self._fail(a, exc)
                continue
            _emit_step(a, event)
            if state.done or state.block != block_before:
                self._emit_block(a, block_before, block_pos)
            if state.done:
                latency = time.perf_counter() - a.started
                try:
                    gen = self.generator.finish(a.job, state.result(), latency)
                except UnmaskError as exc:
                    self._fail(a, exc)
                else:
                    self._succeed(a, gen)

    # ---- outcomes --------------------------------------------------------------------------
    def _emit_block(self, a: _Active, index: int, positions: torch.Tensor) -> None:
        state = a.state
        assert state is not None
        ids = [i for i in state.ids[positions].tolist() if i >= NUM_SPECIAL]
        vocab = self.generator.vocab
        if a.job.modality == "midi":
            text = " ".join(vocab.token_str(i) for i in ids)
        else:
            text = vocab.bpe.decode(
                [i - vocab.ranges.bpe_start for i in ids if i < vocab.ranges.bpe_end]
            )
        a.handle._emit({"type": "block", "index": index, "text": text, "ids": ids})

    def _succeed(self, a: _Active, gen: Generation) -> None:
        out_text = gen.output if isinstance(gen.output, str) else ""
        out_midi = gen.output if isinstance(gen.output, bytes) else b""
        self._end(a, SUCCEEDED, usage=gen.usage(), text=out_text, midi=out_midi)

    def _fail(self, a: _Active, exc: Exception) -> None:
        self._end(a, FAILED, error=_error(exc))

    def _end(self, a: _Active, status: str, *, usage=None, text="", midi=b"", error=None) -> None:
        if a in self._active:
            self._active.remove(a)
        if usage is None and a.state is not None:
            usage = {"nfe": a.state.nfe, "steps": a.state.step, "finish_reason": status,
                     "latency_s": round(time.perf_counter() - a.started, 4)}  # fmt: skip
        a.handle._resolve(JobResult(a.handle.job_id, status, text, midi, usage or {}, error))


def _emit_step(a: _Active, ev: StepEvent) -> None:
    def triples(pos, ids, conf) -> list[list]:
        return [[int(p), int(i), round(float(c), 4)] for p, i, c in
                zip(pos.tolist(), ids.tolist(), conf.tolist(), strict=True)]  # fmt: skip

    a.handle._emit({
        "type": "step",
        "step": ev.step,
        "block": ev.block,
        "committed": triples(ev.committed_positions, ev.committed_ids, ev.committed_confidence),
        "tentative": triples(ev.tentative_positions, ev.tentative_ids, ev.tentative_confidence),
        "remasked": [int(p) for p in ev.remasked_positions.tolist()],
    })  # fmt: skip


def _error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, UnmaskError):
        return {"type": type(exc).__name__, "field": exc.field, "message": exc.message}
    return {"type": type(exc).__name__, "field": None, "message": str(exc)}
