"""The gRPC front end (`grpc.aio`): the Unmask service, health, reflection, interceptors.

The servicer maps messages to dispatcher calls and errors to status codes; auth and request ids
live in interceptors (service/interceptors.py). torch is never imported here: the local
dispatcher imports the Engine lazily when it loads the model, the celery one never does.

    server = UnmaskServer(Settings.from_env())
    port = await server.start()          # binds settings.host:settings.port (port=0: any free)
    await server.wait_for_termination()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.exceptions import RedisError

from unmask.errors import InvalidArgument, NotFound, TooLarge, UnmaskError
from unmask.service import mapping
from unmask.service.batches import (
    FINISHED,
    BatchRunner,
    BatchStore,
    MemoryBatchStore,
    RedisBatchStore,
    new_batch_id,
)
from unmask.service.dispatch import Dispatcher, ModelInfo, make_dispatcher
from unmask.service.interceptors import (
    FIELD_KEY,
    REQUEST_ID_KEY,
    AuthInterceptor,
    RequestIdInterceptor,
    request_id_var,
)
from unmask.service.metrics import FrontEndMetrics, RpcMetrics
from unmask.service.status import to_status
from unmask.settings import Settings
from unmask.v1 import unmask_pb2 as pb
from unmask.v1 import unmask_pb2_grpc as pb_grpc
from unmask.workers.protocol import BrokerUnavailable

log = logging.getLogger("unmask.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Unmask"].full_name  # "unmask.v1.Unmask"
MAX_PAGE_SIZE = 100
RESULTS_POLL_S = 0.2
CANCEL_DRAIN_S = 5.0  # at shutdown, how long the cancellations of abandoned jobs may take
STOP_PHASE_S = 10.0  # at shutdown, the most any other phase may take (more: logged, skipped)


async def abort(context: grpc.aio.ServicerContext, exc: UnmaskError) -> None:
    """End the call with the error's status code; the field goes in the trailing metadata."""
    code, message = to_status(exc)
    trailing = [(REQUEST_ID_KEY, request_id_var.get())]
    if exc.field:
        trailing.append((FIELD_KEY, str(exc.field)))
    if code == grpc.StatusCode.INTERNAL:
        log.error("call failed: %s", exc)
    await context.abort(code, message, trailing_metadata=tuple(trailing))


def _broker_down(exc: BaseException) -> BrokerUnavailable:
    return BrokerUnavailable(f"the job queue's Redis is unreachable ({exc})", field="broker_url")


def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except UnmaskError as exc:
            await abort(context, exc)
        except RedisError as exc:  # the batch store (celery dispatcher)
            await abort(context, _broker_down(exc))

    return call


def streaming(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async with contextlib.aclosing(fn(self, request, context)) as items:
                async for item in items:
                    yield item
        except UnmaskError as exc:
            await abort(context, exc)
        except RedisError as exc:
            await abort(context, _broker_down(exc))

    return call


def _tls_pair(cert: str, key: str) -> tuple[bytes, bytes]:
    """(key, certificate) PEM bytes, checked to belong together: grpc would only say "Failed to
    bind" for a mismatch."""
    import ssl

    if not (cert and key):
        raise InvalidArgument("TLS needs both tls_cert and tls_key",
                              field="tls_key" if cert else "tls_cert")  # fmt: skip
    pems = []
    for path, name in ((key, "tls_key"), (cert, "tls_cert")):
        try:
            with open(path, "rb") as f:
                pems.append(f.read())
        except OSError as exc:
            raise InvalidArgument(f"cannot read {path!r}: {exc.strerror}", field=name) from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise InvalidArgument(f"the key does not match the certificate, or one of them is not "
                              f"PEM ({exc.reason})", field="tls_key") from None  # fmt: skip
    return pems[0], pems[1]


def _samples(req: Any, n: int) -> list[Any]:
    """n copies of a request, each its own job, with seeds seed, seed+1, ..."""
    from unmask.engine.request import new_job_id

    seeds = [req.params.seed + i for i in range(n)]
    try:
        return [dataclasses.replace(req, job_id=new_job_id(),
                                    params=dataclasses.replace(req.params, seed=seed))
                for seed in seeds]  # fmt: skip
    except InvalidArgument as exc:  # the last seeds overflow
        raise mapping.relabel(exc) from None


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as an absolute time for the job (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.time() + max(0.0, remaining)


def _model_proto(m: ModelInfo) -> pb.Model:
    return pb.Model(
        name=m.name, ready=m.ready, dispatcher=m.dispatcher, live_workers=m.live_workers,
        queue_length=m.queue_length, max_seq_len=m.max_seq_len, architecture=m.architecture,
        modalities=[mapping.MODALITY_TO_PROTO[x] for x in m.modalities],
        **_model_details(m.extra.get("details") or {}),
    )  # fmt: skip


def _model_details(d: dict[str, Any]) -> dict[str, Any]:
    """The loaded model's description (service/dispatch.py `model_details`) → Model fields."""
    kinds = {"family": str, "parameters": int, "dtype": str, "mask_id": int, "attention": str,
             "block_size": int, "content_hash": str}  # fmt: skip
    return {k: kind(d[k]) for k, kind in kinds.items() if d.get(k) is not None}


class UnmaskServicer(pb_grpc.UnmaskServicer):
    def __init__(
        self, settings: Settings, dispatcher: Dispatcher, store: BatchStore, runner: BatchRunner
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.store = store
        self.runner = runner
        self._holding: set[asyncio.Task] = set()  # calls between submitting and letting go
        self._cancels: set[asyncio.Future] = set()  # cancellations (and submissions) under way

    # ---- generation ------------------------------------------------------------------------
    def _request(self, msg: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        return mapping.generation_request(
            msg, deadline=_deadline(context), default_model=self.dispatcher.default_model
        )

    def _cancel_soon(self, job_id: str) -> None:
        """The caller went away (cancelled, deadline): stop its job, without blocking."""
        log.info("call ended early; cancelling job %s", job_id)
        task = asyncio.get_running_loop().create_task(self.dispatcher.cancel(job_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _submit(self, req: Any) -> str:
        """Queue the job. A call cancelled while the submission is under way (a 1 ms deadline,
        a client gone) still cancels the job once its id is known, instead of leaving it to
        run for nobody."""
        task = asyncio.ensure_future(self.dispatcher.submit(req))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._cancel_orphan)  # before discard: close() waits on
            self._cancels.add(task)
            task.add_done_callback(self._cancels.discard)
            raise

    def _cancel_orphan(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is None:
            self._cancel_soon(task.result())

    @contextlib.asynccontextmanager
    async def _holding_job(self) -> AsyncIterator[None]:
        """Marks the call's task as holding a job until it has let go of it (followed it to
        the end, or asked for its cancellation)."""
        task = asyncio.current_task()
        assert task is not None
        self._holding.add(task)
        try:
            yield
        finally:
            self._holding.discard(task)

    async def close(self, timeout: float = CANCEL_DRAIN_S) -> None:
        """After the server has stopped: wait for the calls it cancelled to let go of their
        jobs, then for the cancellations they asked for (the dispatcher closes next; a
        cancellation left pending would never reach the queue, its task destroyed with the
        event loop)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        for pending in (self._holding, self._cancels):
            while pending and loop.time() < end:
                await asyncio.wait(set(pending), timeout=end - loop.time())
        for task in set(self._cancels):
            task.cancel()

    @staticmethod
    def _response(final: dict[str, Any], modality: str) -> pb.GenerateResponse:
        result = final["result"]
        if not result.ok:
            raise mapping.job_failed(result)
        return mapping.response_to_proto(result, modality)

    async def _follow(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The job's events; cancels the job if the call ends before its final event. Callers
        close it (`aclosing`): a generator left suspended would be closed by the garbage
        collector, much later, after the call has gone."""
        finished = False
        try:
            async with contextlib.aclosing(self.dispatcher.events(job_id)) as events:
                async for event in events:
                    finished = event.get("type") == "final"
                    yield event
        finally:
            if not finished:
                self._cancel_soon(job_id)

    async def _run_one(self, req: Any) -> pb.GenerateResponse:
        job_id = await self._submit(dataclasses.replace(req, progress=False))  # final event only
        log.info("job %s: %s %s", job_id, req.kind, req.modality)
        async with contextlib.aclosing(self._follow(job_id)) as events:
            async for event in events:
                if event.get("type") == "final":
                    return self._response(event, req.modality)
        raise UnmaskError("the job ended without a result", field="job_id")

    @unary
    async def Generate(self, request, context):
        req = self._request(request, context)
        n = mapping.sample_count(request, allowed=True)
        async with self._holding_job():
            if n == 1:
                return await self._run_one(req)
            # n jobs with consecutive seeds: the Engine runs them side by side, step by step
            tasks = [asyncio.ensure_future(self._run_one(sample)) for sample in _samples(req, n)]
            try:
                responses = await asyncio.gather(*tasks)
            except BaseException:  # one failed, or the call went away: stop the others too
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        out = pb.GenerateResponse()
        out.CopyFrom(responses[0])
        out.samples.extend(responses)
        return out

    @streaming
    async def GenerateStream(self, request, context):
        mapping.sample_count(request, allowed=False)
        req = self._request(request, context)
        async with self._holding_job():
            job_id = await self._submit(req)
            log.info("job %s: %s %s (stream)", job_id, req.kind, req.modality)
            accepted = False
            async with contextlib.aclosing(self._follow(job_id)) as events:
                async for event in events:
                    kind = event.get("type")
                    if kind == "final":
                        if not accepted:
                            yield mapping.event_to_proto({"type": "accepted", "job_id": job_id})
                        yield pb.GenerateEvent(final=self._response(event, req.modality))
                        return
                    accepted = accepted or kind == "accepted"
                    msg = mapping.event_to_proto(event)
                    if msg is not None:
                        yield msg

    # ---- batches ---------------------------------------------------------------------------
    async def _batch(self, batch_id: str) -> dict[str, Any]:
        if not batch_id:
            raise InvalidArgument("give the id of a batch job (from SubmitBatch or ListJobs)",
                                  field="id")  # fmt: skip
        rec = await self.store.get(batch_id)
        if rec is None:
            raise NotFound(f"no batch job {batch_id!r}", field="id", value=batch_id)
        return rec

    @unary
    async def SubmitBatch(self, request, context):
        n = len(request.items)
        if n == 0:
            raise InvalidArgument("a batch needs at least one item", field="items")
        if n > self.settings.max_batch_items:
            raise TooLarge(
                f"{n} items; at most {self.settings.max_batch_items} per batch", field="items"
            )
        if len(request.idempotency_key) > 256:
            raise InvalidArgument("at most 256 characters", field="idempotency_key")
        default = request.model or self.dispatcher.default_model
        seen: set[str] = set()
        items, models = [], set()
        for i, item in enumerate(request.items):
            cid = item.custom_id
            if not cid or len(cid) > 256:
                raise InvalidArgument("needs 1..256 characters", field=f"items[{i}].custom_id")
            if cid in seen:
                raise InvalidArgument(f"duplicate {cid!r}", field=f"items[{i}].custom_id")
            seen.add(cid)
            try:
                mapping.sample_count(item.request, allowed=False)
                req = mapping.generation_request(item.request, default_model=default)
            except UnmaskError as exc:
                raise mapping.relabel(exc, prefix=f"items[{i}].request.") from None
            models.add(req.model)
            items.append({"custom_id": cid, "request": req.to_dict()})
        for model in sorted(models):
            await self.dispatcher.check_model(model)
        record = {
            "id": new_batch_id(), "model": default, "created_at": time.time(),
            "idempotency_key": request.idempotency_key,
        }  # fmt: skip
        batch_id, created = await self.store.create(record, items)
        log.info("batch %s: %s (%d items)", batch_id, "created" if created else "existing", n)
        self.runner.kick()
        return mapping.batch_to_proto(await self._batch(batch_id))

    @unary
    async def GetJob(self, request, context):
        rec = await self._batch(request.id)
        note = await self._batch_note(request.id) if rec["status"] not in FINISHED else ""
        return mapping.batch_to_proto(rec, note)

    async def _batch_note(self, batch_id: str, limit: int = 64) -> str:
        """The notes of the batch's items in flight (at most `limit` asked), counted."""
        flights = list((await self.store.inflight(batch_id)).values())[:limit]
        notes = await asyncio.gather(*(self.dispatcher.note(f["job_id"]) for f in flights))
        counts = Counter(n for n in notes if n)
        return "; ".join(f"{k} item{'s' if k > 1 else ''} {n}" for n, k in counts.items())

    @unary
    async def ListJobs(self, request, context):
        size = min(request.page_size or 20, MAX_PAGE_SIZE)
        try:
            offset = int(request.page_token or 0)
            if offset < 0:
                raise ValueError
        except ValueError:
            raise InvalidArgument("not a token from ListJobs", field="page_token") from None
        recs = await self.store.list(offset, size + 1)
        more = len(recs) > size
        return pb.ListJobsResponse(
            jobs=[mapping.batch_to_proto(r) for r in recs[:size]],
            next_page_token=str(offset + size) if more else "",
        )

    @unary
    async def CancelJob(self, request, context):
        rec = await self._batch(request.id)
        if rec["status"] not in FINISHED:
            await self.store.request_cancel(request.id)
            self.runner.kick()
            log.info("batch %s: cancel requested", request.id)
        return mapping.batch_to_proto(await self._batch(request.id))

    @streaming
    async def StreamJobResults(self, request, context):
        await self._batch(request.id)
        offset = request.offset
        while True:
            page = await self.store.results(request.id, offset, 100)
            for item in page:
                yield mapping.item_result_to_proto(item)
            offset += len(page)
            if page:
                continue
            rec = await self._batch(request.id)
            if not request.follow or rec["status"] in FINISHED:
                if rec["status"] in FINISHED:  # results recorded just before the finalize
                    for item in await self.store.results(request.id, offset, 1 << 30):
                        yield mapping.item_result_to_proto(item)
                return
            await asyncio.sleep(RESULTS_POLL_S)

    # ---- models ----------------------------------------------------------------------------
    @unary
    async def ListModels(self, request, context):
        return pb.ListModelsResponse(
            models=[_model_proto(m) for m in await self.dispatcher.models()]
        )

    @unary
    async def GetModel(self, request, context):
        name = request.name or self.dispatcher.default_model
        for m in await self.dispatcher.models():
            if m.name == name:
                return _model_proto(m)
        raise NotFound(f"unknown model {name!r}", field="name", value=name)


class UnmaskServer:
    """The whole front end: gRPC server, dispatcher, batch runner, health updates."""

    def __init__(
        self,
        settings: Settings,
        *,
        dispatcher: Dispatcher | None = None,
        generator: Any = None,
        health_interval_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher or make_dispatcher(settings, generator)
        self.store = self._make_store()
        self.runner = BatchRunner(self.store, self.dispatcher, window=settings.batch_window)
        self.health = health.aio.HealthServicer()
        self.health_interval_s = health_interval_s or min(1.0, settings.heartbeat_s)
        self.serving: bool | None = None
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self.servicer: UnmaskServicer | None = None
        self._health_task: asyncio.Task | None = None
        self.metrics: FrontEndMetrics | None = None  # /metrics (settings.metrics_port)

    def _make_store(self) -> BatchStore:
        if self.dispatcher.kind == "local":
            return MemoryBatchStore()
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(
            self.settings.broker_url, socket_connect_timeout=1.0, socket_timeout=2.0
        )
        return RedisBatchStore(client, ttl_s=self.settings.result_ttl_s)

    def _options(self) -> list[tuple[str, Any]]:
        limit = self.settings.max_message_bytes
        return [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]

    async def start(self, port: int | None = None) -> int:
        s = self.settings
        calls = RpcMetrics() if s.metrics_port else None
        interceptors: list[grpc.aio.ServerInterceptor] = [RequestIdInterceptor(calls)]
        if s.auth_tokens:
            interceptors.append(AuthInterceptor(s.auth_tokens))
        server = grpc.aio.server(interceptors=interceptors, options=self._options())
        self.servicer = UnmaskServicer(s, self.dispatcher, self.store, self.runner)
        pb_grpc.add_UnmaskServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{s.host}:{s.port if port is None else port}"
        try:
            if s.tls_cert or s.tls_key:
                creds = grpc.ssl_server_credentials([_tls_pair(s.tls_cert, s.tls_key)])
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpc: "Failed to bind to address"
            self.port = 0
        if not self.port:
            raise InvalidArgument(f"cannot listen on {address}: the port is in use (or the "
                                  "address is not this machine's)", field="port")  # fmt: skip
        if s.metrics_port:
            try:  # a metrics port in use: one clear error, nothing left listening
                self.metrics = FrontEndMetrics.start(s, self.dispatcher)
            except InvalidArgument:
                await server.stop(None)
                raise
        await self._set_health(False)
        await server.start()
        self._server = server
        await self.dispatcher.start()
        self.runner.start()
        self._health_task = asyncio.create_task(self._watch_health(), name="unmask-health")
        log.info("serving %s on %s (%s dispatcher, auth %s, tls %s)", SERVICE_NAME,
                 f"{s.host}:{self.port}", self.dispatcher.kind,
                 "on" if s.auth_tokens else "off", "on" if s.tls_cert else "off")  # fmt: skip
        return self.port

    async def _set_health(self, serving: bool) -> None:
        if serving == self.serving:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        if self.serving is not None:
            log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving

    async def check_health(self) -> bool:
        try:
            serving = await self.dispatcher.ready()
        except UnmaskError:
            serving = False
        await self._set_health(serving)
        return serving

    async def _watch_health(self) -> None:
        while True:
            try:
                await self.check_health()
            except Exception:
                log.exception("health check failed")
            await asyncio.sleep(self.health_interval_s)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving, then let go of jobs, the batch runner, the dispatcher and the store.
        Each phase has a time limit: a shutdown that hangs on one part (a queue call, a call
        the core does not finish) logs which and goes on, instead of never returning."""
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._server is not None:
            await _phase("grpc server", self._stop_grpc(grace), grace + STOP_PHASE_S)
        if self.servicer is not None:
            await _phase("abandoned calls", self.servicer.close(), CANCEL_DRAIN_S + STOP_PHASE_S)
        await _phase("batch runner", self.runner.close(), STOP_PHASE_S)
        await _phase("dispatcher", self.dispatcher.close(), STOP_PHASE_S)
        if isinstance(self.store, RedisBatchStore):
            await _phase("batch store", self.store.r.aclose(), STOP_PHASE_S)
        metrics, self.metrics = self.metrics, None
        if metrics is not None:
            await _phase("metrics exporter", asyncio.to_thread(metrics.close), STOP_PHASE_S)

    async def _stop_grpc(self, grace: float) -> None:
        assert self._server is not None
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


async def serve(settings: Settings, port: int | None = None) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully."""
    import signal

    server = UnmaskServer(settings)
    http = None
    if settings.http_port:  # bound before anything starts: a port in use is one line
        from unmask.service.gateway import EmbeddedGateway

        http = EmbeddedGateway(settings)
    await server.start(port)
    if http is not None:
        await http.start(server.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down")
    if http is not None:
        await http.stop()
    await server.stop()
    for task in (waiter, stopper):
        task.cancel()


async def _phase(name: str, work: Awaitable[Any], timeout: float) -> None:
    """Await one phase of a shutdown; one that overruns is logged with every stack (taken
    before it is cancelled, so they show where it waits) and left behind."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if done:
        task.result()
        return
    log.error("shutdown: %s took over %.0f s; going on without it", name, timeout)
    dump_stacks(f"shutdown: {name} overran")
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)  # one that swallows its cancellation stays behind


def dump_stacks(why: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Every thread's stack and every task of the running loop, to the log: what a hang was
    waiting for."""
    import sys
    import traceback

    frames = sys._current_frames()
    lines = [f"{why}; threads:"]
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        if frame is not None:
            lines.append(f"-- thread {thread.name}\n" + "".join(traceback.format_stack(frame)))
    try:
        for task in asyncio.all_tasks(loop):
            lines.append(f"-- task {task.get_name()}: {task.get_coro()!r}")
            lines.extend("".join(traceback.format_stack(f)) for f in task.get_stack(limit=8))
    except RuntimeError:  # no loop here, or its tasks changed while we looked
        pass
    log.error("\n".join(lines))


async def _settle() -> None:
    """Cancel and await whatever is left on the loop and close its async generators, as
    `asyncio.run` does: a task dropped with its loop still pending is logged as "Task was
    destroyed but it is pending" (and its clean-up never runs)."""
    rest = asyncio.all_tasks() - {asyncio.current_task()}
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


class ServerThread:
    """An `UnmaskServer` on its own event loop in a background thread, for synchronous code:
    the demo, tests, notebooks.

        with ServerThread(Settings(model=...)) as srv:
            client = Client(f"127.0.0.1:{srv.port}")
    """

    def __init__(self, settings: Settings, **server_kwargs: Any) -> None:
        self.settings = settings
        self._kwargs = server_kwargs
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="unmask-server",
                                        daemon=True)  # fmt: skip
        self.server: UnmaskServer | None = None
        self.port = 0

    def call(self, coro: Any, timeout: float | None = 60, what: str = "a server call") -> Any:
        """Run a coroutine on the server's loop and return its result; one that takes over
        `timeout` seconds is cancelled and raises TimeoutError naming `what`."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            dump_stacks(f"{what} took over {timeout} s", self.loop)
            future.cancel()
            raise TimeoutError(f"{what} took over {timeout} s") from None

    def start(self, port: int = 0, wait_ready: bool = True, timeout: float = 120) -> int:
        self._thread.start()

        async def boot() -> int:
            self.server = UnmaskServer(self.settings, **self._kwargs)
            return await self.server.start(port)

        try:  # a server that fails to start is stopped here: nobody else holds it
            self.port = self.call(boot(), what="starting the server")
            if wait_ready:
                wait = getattr(self.server.dispatcher, "wait_ready", None) if self.server else None
                if wait is not None:
                    self.call(wait(), timeout, what="loading the model")
                self.call(self.server.check_health(), what="the first health check")  # type: ignore[union-attr]
        except BaseException:
            self.stop()
            raise
        return self.port

    def stop(self, timeout: float = 60) -> None:
        """Stop the server, then cancel whatever is left on its loop and close the loop, even
        when the graceful stop fails or overruns: a loop left running keeps background tasks
        (the batch runner, health checks) alive for the rest of the process."""
        if self.loop.is_closed():
            return
        server, self.server = self.server, None
        try:
            if server is not None:
                self.call(server.stop(grace=0.5), timeout, what="stopping the server")
        finally:
            if self._thread.is_alive():
                try:
                    self.call(_settle(), timeout, what="cancelling the server's tasks")
                finally:
                    self.loop.call_soon_threadsafe(self.loop.stop)
                    self._thread.join(10)
            if not self.loop.is_running():
                self.loop.close()

    def __enter__(self) -> ServerThread:
        if not self.port:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
