"""The Engine: one thread owns the model and runs denoising steps for many jobs at once.

Loop: admit queued jobs (up to `max_batch`) → retire cancelled / expired ones → run ONE
denoising step for every active diffusion job as one batched forward pass (windows padded, the
padding masked both ways) → let each job's sampler commit/remask → publish events → retire
finished jobs. Jobs join and leave between steps (continuous batching at the step level).
The autoregressive baseline's jobs batch the same way: their prefill and then one token per
step each, against their own KV caches, in the same forward (`ARState`), so diffusion and AR are
compared at the same batch sizes.

One bad job never takes the others down: every job's part of a turn (admission, its cancel
check, its step, its retirement) runs in its own `try`, and when the batched forward pass fails
each job is run alone to find the culprit(s), which fail; the rest go on. A job that fails on an
untyped exception is a bug: its traceback is logged and the front end reports INTERNAL. If the
loop thread dies anyway (a bug outside any job), a watchdog thread restarts it; `healthy` is
False meanwhile, and queued and active jobs carry on after the restart.

The Engine knows nothing of Celery, Redis or gRPC: `submit()` returns a `JobHandle` with an
event iterator, the final result and `cancel()`; the worker and the local dispatcher wrap it.
Nor of Prometheus: it reports what it does to an optional `EngineObserver` (batch sizes, tokens
committed, job latencies), which the worker and the front end export (unmask/metrics.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from unmask.engine.request import GenerationRequest
from unmask.engine.result import CANCELLED, DEADLINE, FAILED, SUCCEEDED, GenerationResult
from unmask.errors import Cancelled, DeadlineExceeded, NotReady, QueueFull, UnmaskError, error_dict
from unmask.models.ar_decoding import ARState
from unmask.models.block_sampler import new_state
from unmask.models.generation import Generation, Generator, Prepared, ar_params, strip_healed
from unmask.models.network import KVCache
from unmask.models.sampler import (
    CacheCollator,
    Draw,
    SamplerState,
    StepEvent,
    StepInputs,
    collate_inputs,
    run_batch,
    sample_draws,
    split_outputs,
)
from unmask.models.speculative import SpeculativeDecoder
from unmask.tokenizers.specials import NUM_SPECIAL

log = logging.getLogger("unmask.engine")

RESTART_DELAY_S = 0.1  # the watchdog waits this long before restarting a dead loop thread...
MAX_RESTART_DELAY_S = 2.0  # ...doubling with each death in a row, up to this
# After this many deaths in a row (no whole turn between them) the active jobs are failed: one of
# them may be what kills the loop, and a job must not keep the Engine down forever.
CRASH_LOOP_DEATHS = 3
WATCH_INTERVAL_S = 0.5  # how often the watchdog looks up from the thread it guards for close()


class EngineObserver(Protocol):
    """What the Engine reports as it runs (for metrics). Called on the loop thread, so each
    call must be cheap; one that raises is logged and ignored, never a job's failure."""

    def forward(self, batch_size: int, seconds: float) -> None:
        """One batched forward pass over `batch_size` jobs' windows."""

    def job_step(self, committed: int) -> None:
        """One diffusion job's denoising step, which committed `committed` tokens."""

    def job_ended(self, status: str, seconds: float) -> None:
        """A job's final status, `seconds` after its submission."""


class JobHandle:
    """The caller's side of a job: events as they happen, the result, cancellation. With a
    `sink`, every event goes to it (on the Engine's thread: it must neither block nor raise)
    instead of to `events()`."""

    def __init__(
        self, request: GenerationRequest, sink: Callable[[dict], None] | None = None
    ) -> None:
        self.request = request
        self.job_id = request.job_id
        self.submitted = time.perf_counter()
        self._sink = sink
        self._events: queue.Queue[dict | None] = queue.Queue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self.cancel_requested = threading.Event()

    def cancel(self) -> None:
        self.cancel_requested.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
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
        if self._sink is not None:
            self._sink(event)
        else:
            self._events.put(event)

    def _resolve(self, result: GenerationResult) -> None:
        if self._done.is_set():  # the first outcome stands (a retirement that raised half-way)
            return
        self._result = result
        self._emit({"type": "final", "result": result})
        self._events.put(None)
        self._done.set()


@dataclass(eq=False)
class _Active:
    handle: JobHandle
    job: Prepared
    state: SamplerState | ARState | SpeculativeDecoder
    started: float
    should_cancel: Callable[[], bool] | None = None
    # position -> [position, id, confidence] of its committed token (return_tokens only)
    tokens: dict[int, list[Any]] = field(default_factory=dict)


class Engine:
    def __init__(
        self,
        generator: Generator,
        *,
        max_batch: int = 16,
        max_queue: int = 1024,
        batching: bool = True,
        restart_delay_s: float = RESTART_DELAY_S,
        observer: EngineObserver | None = None,
    ) -> None:
        self.generator = generator
        self.observer = observer
        self.max_batch = max_batch if batching else 1
        self.max_queue = max_queue
        self.restart_delay_s = restart_delay_s
        self._queue: deque[tuple[JobHandle, Callable[[], bool] | None]] = deque()
        self._active: list[_Active] = []  # touched by the loop thread only (or while it is dead)
        self._lock = threading.Condition()
        self._stop = False
        self._closing = threading.Event()  # wakes the watchdog
        self._thread: threading.Thread | None = None  # the loop
        self._watchdog: threading.Thread | None = None
        self._deaths = 0  # loop deaths since the last whole turn
        self.restarts = 0  # loop threads the watchdog started
        self.forward_passes = 0  # forwards run (one per engine step, more when isolating)
        self.rows_run = 0  # job-steps executed (sum of batch sizes)
        self._caches = CacheCollator()  # the batched KV past, kept between steps

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._spawn()
            self._watchdog = threading.Thread(
                target=self._watch, name="unmask-engine-watchdog", daemon=True
            )
            self._watchdog.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._closing.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout)  # first: it may be about to start a new loop thread
            self._watchdog = None
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._drain()  # a loop that died (or never ran) cannot end its jobs itself

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def load(self) -> int:
        with self._lock:
            return len(self._queue) + len(self._active)

    @property
    def healthy(self) -> bool:
        """The loop thread runs (False while the watchdog waits to restart it, and after close)."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stop

    # ---- API -------------------------------------------------------------------------------
    def submit(
        self,
        request: GenerationRequest,
        should_cancel: Callable[[], bool] | None = None,
        on_event: Callable[[dict], None] | None = None,
    ) -> JobHandle:
        """Queue a job. `should_cancel` is polled between steps (e.g. a flag in Redis);
        `on_event` (optional) receives the job's events instead of `JobHandle.events()`."""
        handle = JobHandle(request, on_event)
        # before queueing: a job the loop fails at once must still see `accepted` first
        handle._emit({"type": "accepted", "job_id": handle.job_id})
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the engine queue is full ({self.max_queue} jobs)", field="queue")
            self._queue.append((handle, should_cancel))
            self._lock.notify_all()
        return handle

    def run_one(self, request: GenerationRequest) -> GenerationResult:
        return self.submit(request).result()

    # ---- the loop thread and its watchdog --------------------------------------------------
    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._run, name="unmask-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # the thread ends here; the watchdog starts a new one
            self._deaths += 1
            log.critical("the engine thread died", exc_info=True)

    def _watch(self) -> None:
        """Restart the loop thread whenever it dies, until close()."""
        while not self._closing.is_set():
            thread = self._thread
            if thread is None:
                return
            thread.join(WATCH_INTERVAL_S)
            if thread.is_alive() or self._stop:
                continue
            deaths = self._deaths
            delay = min(self.restart_delay_s * 2 ** max(deaths - 1, 0), MAX_RESTART_DELAY_S)
            log.error("engine thread dead (%d in a row); restarting in %.2fs", deaths, delay)
            if self._closing.wait(delay):
                return
            if deaths >= CRASH_LOOP_DEATHS:
                self._fail_stranded(deaths)
            self._spawn()
            self.restarts += 1
            log.warning("engine thread restarted (%d restarts)", self.restarts)

    def _fail_stranded(self, deaths: int) -> None:
        """Fail the jobs active through a crash loop; the queued ones go on."""
        message = f"the engine thread died {deaths} times in a row while this job was active"
        for a in list(self._active):
            log.error("job %s failed: %s", a.handle.job_id, message)
            self._end(a, FAILED, error={"type": "EngineCrashed", "code": "INTERNAL", "field": None,
                                        "message": message})  # fmt: skip

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # per thread: a restarted loop needs it again
        while self._wait_for_work():
            self._admit_queued()
            self._retire_interrupted()
            self._step()
            self._deaths = 0  # a whole turn ran: not a crash loop
        self._drain()

    def _wait_for_work(self) -> bool:
        """Block until there are jobs (True) or the Engine is closing (False)."""
        with self._lock:
            while not self._stop and not self._queue and not self._active:
                self._lock.wait()
            return not self._stop

    def _drain(self) -> None:
        closed = error_dict(NotReady("the engine closed before the job finished"))
        for a in list(self._active):
            self._end(a, CANCELLED, error=closed)
        with self._lock:
            queued, self._queue = list(self._queue), deque()
        for handle, _ in queued:
            self._resolve(handle, GenerationResult(handle.job_id, CANCELLED, error=closed))

    # ---- admission and interruption ---------------------------------------------------------
    def _admit_queued(self) -> None:
        # one at a time, so a job is either still queued or active if the loop dies here
        while True:
            with self._lock:
                if not self._queue or len(self._active) >= self.max_batch:
                    return
                handle, should_cancel = self._queue.popleft()
            try:
                self._active.append(self._prepare(handle, should_cancel))
            except Exception as exc:
                _log_failure(handle.job_id, "admit", exc)
                self._resolve(handle, GenerationResult(handle.job_id, FAILED, error=_error(exc)))

    def _prepare(self, handle: JobHandle, should_cancel: Callable[[], bool] | None) -> _Active:
        job = self.generator.prepare(handle.request)
        state: SamplerState | ARState | SpeculativeDecoder
        if job.params.speculative:  # its rows join the batched forward (models/speculative.py)
            state = self.generator.decoder(job)
        elif job.canvas is None:
            assert job.ar_prompt is not None
            state = ARState(job.ar_prompt, ar_params(job.params), self.generator.sampler_vocab,
                            modality=job.modality, device=self._device,
                            first_allowed=job.first_allowed)  # fmt: skip
        else:
            state = new_state(
                self.generator.model,
                job.canvas,
                job.params,
                self.generator.sampler_vocab,
                device=self._device,
            )
            state.tentative = handle.request.progress  # no step events: no guesses to report
        return _Active(handle, job, state, time.perf_counter(), should_cancel)

    @property
    def _device(self) -> torch.device:
        return next(self.generator.model.parameters()).device

    def _retire_interrupted(self) -> None:
        now = time.time()
        for a in list(self._active):
            try:  # `should_cancel` may reach Redis: its failure is this job's alone
                self._end_if_interrupted(a, now)
            except Exception as exc:
                self._fail(a, exc, "retire")

    def _end_if_interrupted(self, a: _Active, now: float) -> None:
        deadline = a.handle.request.deadline
        if a.handle.cancel_requested.is_set() or (a.should_cancel and a.should_cancel()):
            self._end(a, CANCELLED, error=error_dict(Cancelled("job cancelled")))
        elif deadline is not None and now > deadline:
            self._end(a, DEADLINE, error=error_dict(DeadlineExceeded("the job's deadline passed")))

    # ---- one step ----------------------------------------------------------------------------
    def _step(self) -> None:
        ready: list[tuple[_Active, StepInputs]] = []
        alone = len(self._active) == 1
        for a in list(self._active):
            try:
                state = a.state
                if isinstance(state, SpeculativeDecoder):  # one row per draft, plus one
                    state.drafting = alone  # beside other jobs the batch is full already
                    ready.extend((a, row) for row in state.step_inputs(state.prepare_rows()))
                else:
                    ready.append((a, state.prepare_inputs()))
            except Exception as exc:
                self._fail(a, exc, "step")
        proposed: list[tuple[_Active, Draw]] = []
        speculative: dict[_Active, list[tuple[torch.Tensor, KVCache | None]]] = {}
        for a, (logits, cache) in self._forward_isolated(ready):
            if isinstance(a.state, SpeculativeDecoder):
                speculative.setdefault(a, []).append((logits, cache))
                continue
            try:
                proposed.append((a, a.state.propose(logits, cache)))
            except Exception as exc:
                self._fail(a, exc, "step")
        for a, rows in speculative.items():
            if a in self._active and self._advance_speculative(a, rows):
                self._retire_finished(a)
        for a, draw, sampled in self._sample_isolated(proposed):
            if self._advance(a, draw, sampled):
                self._retire_finished(a)

    def _advance_speculative(
        self, a: _Active, rows: list[tuple[torch.Tensor, KVCache | None]]
    ) -> bool:
        """Finish a speculative job's step from its rows (verify, commit, draft) and publish
        it, as `_advance` does; a step may finish more than one block. True when it is done."""
        state = a.state
        assert isinstance(state, SpeculativeDecoder)
        try:
            block_before = state.block
            event = state.advance_rows(torch.stack([logits for logits, _ in rows]), rows[0][1])
            finished = [(i, state.blocks[i]) for i in range(block_before, state.block)]
            self._publish(a, event, finished)
        except Exception as exc:
            self._fail(a, exc, "step")
            return False
        return state.done

    def _publish(self, a: _Active, event: StepEvent,
                 finished: Sequence[tuple[int, torch.Tensor]]) -> None:  # fmt: skip
        """A job's step to the observer, its kept tokens and (progress) its step event and an
        event for each block the step finished: (index, positions)."""
        self._observe("job_step", int(event.committed_positions.numel()))
        if a.handle.request.return_tokens:
            _record_tokens(a, event)
        if a.handle.request.progress:
            _emit_step(a, event)
            for index, positions in finished:
                self._emit_block(a, index, positions)

    def _sample_isolated(
        self, proposed: list[tuple[_Active, Draw]]
    ) -> list[tuple[_Active, Draw, tuple[torch.Tensor, torch.Tensor]]]:
        """Every job's tokens from one batched sampling (`sample_draws`); if it fails, each
        job's alone, so only the culprits fail."""
        if not proposed:
            return []
        try:
            drawn = sample_draws([d for _, d in proposed])
            return [(a, d, x) for (a, d), x in zip(proposed, drawn, strict=True)]
        except Exception:
            if len(proposed) > 1:
                log.warning("batched sampling of %d jobs failed; sampling each alone",
                            len(proposed), exc_info=True)  # fmt: skip
        out = []
        for a, d in proposed:
            try:
                out.append((a, d, sample_draws([d])[0]))
            except Exception as exc:
                self._fail(a, exc, "step")
        return out

    def _forward_isolated(
        self, ready: list[tuple[_Active, StepInputs]]
    ) -> list[tuple[_Active, tuple[torch.Tensor, KVCache | None]]]:
        """The batch's forward pass; if it fails, each job's alone: only the culprits fail."""
        if not ready:
            return []
        try:
            return list(zip([a for a, _ in ready], self._forward(ready), strict=True))
        except Exception as exc:
            if len(ready) == 1:
                self._fail(ready[0][0], exc, "step")
                return []
            log.warning("the batched forward of %d jobs failed (%s: %s); running each alone",
                        len(ready), type(exc).__name__, exc)  # fmt: skip
        outputs = []
        for a, inputs in ready:  # the inputs are unchanged: the failed forward wrote nothing
            try:
                outputs.append((a, self._forward([(a, inputs)])[0]))
            except Exception as exc:
                self._fail(a, exc, "step")
        return outputs

    def _forward(
        self, ready: Sequence[tuple[_Active, StepInputs]]
    ) -> list[tuple[torch.Tensor, KVCache | None]]:
        """One forward pass over the jobs' windows → each job's (logits, cache)."""
        t0 = time.perf_counter()
        pad_id = self.generator.vocab.pad_id
        caches = self._caches if len(ready) > 1 else None  # a lone job's cache is used as is
        batch = collate_inputs([inputs for _, inputs in ready], pad_id, caches)
        logits, cache = run_batch(self.generator.model, batch)
        outputs = split_outputs(batch, logits, cache)
        self.forward_passes += 1
        self.rows_run += len(ready)
        self._observe("forward", len(ready), time.perf_counter() - t0)
        return outputs

    def _advance(self, a: _Active, draw: Draw, sampled: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Finish the job's step with its sampled tokens and publish it; True when it is done."""
        state = a.state
        try:
            block_before = state.block
            block_pos = state.blocks[block_before]
            event = state.finish_step(draw, *sampled)
            ended = state.done or state.block != block_before
            self._publish(a, event, [(block_before, block_pos)] if ended else [])
        except Exception as exc:
            self._fail(a, exc, "step")
            return False
        return state.done

    def _retire_finished(self, a: _Active) -> None:
        try:
            latency = time.perf_counter() - a.started
            self._succeed(a, self.generator.finish(a.job, a.state.result(), latency))
        except Exception as exc:
            self._fail(a, exc, "retire")

    # ---- outcomes --------------------------------------------------------------------------
    def _emit_block(self, a: _Active, index: int, positions: torch.Tensor) -> None:
        state = a.state
        vocab = self.generator.vocab
        if getattr(vocab, "public", False):  # a public checkpoint's tokenizer (tokenizers/hf.py)
            ids = vocab.strip_specials(state.ids[positions].tolist())
            a.handle._emit({"type": "block", "index": index, "text": vocab.decode(ids), "ids": ids})
            return
        ids = [i for i in state.ids[positions].tolist() if i >= NUM_SPECIAL]
        if a.job.modality == "midi":
            text = " ".join(vocab.token_str(i) for i in ids)
        else:
            text = vocab.bpe.decode(
                [i - vocab.ranges.bpe_start for i in ids if i < vocab.ranges.bpe_end]
            )
            if index == 0:
                text = strip_healed(text, a.job.healed)
        a.handle._emit({"type": "block", "index": index, "text": text, "ids": ids})

    def _succeed(self, a: _Active, gen: Generation) -> None:
        request = a.handle.request
        out_text = gen.output if isinstance(gen.output, str) else ""
        out_midi = gen.output if isinstance(gen.output, bytes) else b""
        usage = gen.usage()
        if request.stop and out_text:
            out_text, stopped = cut_at_stop(out_text, request.stop, request.prompt)
            if stopped:
                usage["finish_reason"] = "stop"
        # what it ran with; None (no block, no threshold, no cap) is left out, as on the wire
        params = {k: v for k, v in a.job.params.to_dict().items() if k != "unset" and v is not None}
        # tokens still on the final canvas (not turned into PAD after an EOS)
        tokens = [a.tokens[p] for p in sorted(a.tokens) if p < len(gen.ids)
                  and gen.ids[p] == a.tokens[p][1]] if request.return_tokens else []  # fmt: skip
        self._end(a, SUCCEEDED, usage=usage, text=out_text, midi=out_midi, params=params,
                  tokens=tokens)  # fmt: skip

    def _fail(self, a: _Active, exc: Exception, stage: str) -> None:
        _log_failure(a.handle.job_id, stage, exc)
        self._end(a, FAILED, error=_error(exc))

    def _end(self, a: _Active, status: str, *, usage=None, text="", midi=b"", error=None,
             params=None, tokens=None) -> None:  # fmt: skip
        if a in self._active:  # first: a job that cannot be resolved must not stay active
            self._active.remove(a)
        if usage is None:
            usage = {"nfe": a.state.nfe, "steps": a.state.step, "finish_reason": status,
                     "latency_s": round(time.perf_counter() - a.started, 4)}  # fmt: skip
        self._resolve(a.handle, GenerationResult(a.handle.job_id, status, text, midi, usage or {},
                                                 error, params or {}, tokens or []))  # fmt: skip

    def _resolve(self, handle: JobHandle, result: GenerationResult) -> None:
        if not handle.done():  # counted before the caller can see the result
            self._observe("job_ended", result.status, time.perf_counter() - handle.submitted)
        handle._resolve(result)

    def _observe(self, what: str, *args: Any) -> None:
        """Tell the observer (if any); its failure is logged, never the Engine's."""
        if self.observer is None:
            return
        try:
            getattr(self.observer, what)(*args)
        except Exception:
            log.warning("the engine observer failed on %s", what, exc_info=True)


def cut_at_stop(text: str, stop: Sequence[str], prompt: str = "") -> tuple[str, bool]:
    """`text` up to the first stop string that starts after the echoed prompt."""
    start = len(prompt) if prompt and text.startswith(prompt) else 0
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _record_tokens(a: _Active, ev: StepEvent) -> None:
    """Keep each generated position's committed token and its confidence (return_tokens)."""
    for p in ev.remasked_positions.tolist():
        a.tokens.pop(int(p), None)
    for p, i, c in zip(ev.committed_positions.tolist(), ev.committed_ids.tolist(),
                       ev.committed_confidence.tolist(), strict=True):  # fmt: skip
        a.tokens[int(p)] = [int(p), int(i), round(float(c), 4)]


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


def _log_failure(job_id: str, stage: str, exc: Exception) -> None:
    """A typed error is the request's fault (one line); anything else is a bug (traceback)."""
    if isinstance(exc, UnmaskError):
        log.info("job %s failed in %s: %s", job_id, stage, exc)
    else:
        log.error("job %s failed in %s (INTERNAL)", job_id, stage, exc_info=exc)


def _error(exc: Exception) -> dict[str, Any]:
    try:
        return error_dict(exc)
    except Exception:  # an exception that cannot even print itself must still fail its job
        return {"type": type(exc).__name__, "code": "INTERNAL", "field": None,
                "message": type(exc).__name__}  # fmt: skip
