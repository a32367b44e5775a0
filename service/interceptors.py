"""Cross-cutting concerns of every call: request ids, structured logs, metrics, bearer-token
auth.

- Request id: taken from the `x-request-id` metadata (if it is a sane token) or assigned; it is
  returned in the initial and trailing metadata and put in a context variable that a logging
  filter adds to every log line written while the call runs.
- Auth: with tokens configured, every call except the health service needs
  `authorization: Bearer <token>`; anything else is UNAUTHENTICATED. Tokens are compared in
  constant time.
- A request message that does not parse (corrupt wire format, bad UTF-8 in a string field) is
  INVALID_ARGUMENT with field `request` (grpc would answer UNKNOWN), after auth: an
  unauthenticated caller still gets UNAUTHENTICATED.
- One wrapper: AuthInterceptor swaps a refused call's behaviour for its refusal; the request id
  interceptor (the outermost, the handler grpc runs) wraps whichever behaviour it gets once, and
  runs a streaming method's generator itself (`_write_stream`), so that the generator ends, and
  its clean-up runs, inside the call, even when the client vanishes mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import grpc

REQUEST_ID_KEY = "x-request-id"
FIELD_KEY = "unmask-field"  # trailing metadata: the request field at fault
HEALTH_PREFIX = "/grpc.health.v1.Health/"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
log = logging.getLogger("unmask.service.rpc")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record (`-` outside a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s %(message)s"


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger("unmask")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    out = {}
    for key, value in details.invocation_metadata or ():
        out[key.lower()] = value if isinstance(value, str) else value.decode(errors="replace")
    return out


class Undecodable:
    """Stands in for a request message that did not parse; the call ends INVALID_ARGUMENT."""

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns Undecodable instead of raising (grpc would say UNKNOWN)."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or whatever a parser raises
            return Undecodable(f"{type(exc).__name__}: {exc}")

    return parse


async def _reject_undecodable(context: grpc.aio.ServicerContext, request: Undecodable) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request: not a valid message of this method ({request.error})",
        trailing_metadata=((REQUEST_ID_KEY, request_id_var.get()), (FIELD_KEY, "request")),
    )


async def _write_stream(behaviour: Any, request: Any, context: grpc.aio.ServicerContext) -> None:
    """Send a server-streaming behaviour's messages with `context.write`, and close its
    generator here, in the call's own task.

    Why not hand grpc the generator: when the client goes away while grpc awaits a write, grpc
    cancels its own loop but never closes the generator. asyncio's garbage-collector hook closes
    it later, in a task of its own, after the call has ended: the call's clean-up (its log
    line, its job's cancellation, its Redis reader) then ran late, and the part that touched
    the ended call (`context.peer()`) crashed the process (grpcio >= 1.81: segfault in cygrpc).
    """
    if inspect.iscoroutinefunction(behaviour):  # writes for itself (health's Watch, a refusal)
        await behaviour(request, context)
        return
    async with contextlib.aclosing(behaviour(request, context)) as messages:
        async for message in messages:
            await context.write(message)


def _like(
    handler: grpc.RpcMethodHandler,
    behaviour: Callable[..., Any],
    deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A unary-request handler of the same kind and serializer as `handler`, running
    `behaviour` (a coroutine function: for a stream, it writes with `context.write`)."""
    make = (grpc.unary_stream_rpc_method_handler if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler)  # fmt: skip
    return make(
        behaviour, deserializer or handler.request_deserializer, handler.response_serializer
    )


class CallMetrics(Protocol):
    """Where the calls are counted (service/metrics.py's RpcMetrics)."""

    def started(self, method: str) -> None: ...

    def ended(self, method: str, outcome: str, seconds: float) -> None: ...


class _CallLog:
    """One call's request id in the context variable, its closing log line and its metrics.

    The peer is read once, while the call is live: `context.peer()` after the call has ended
    reads memory grpc has freed (grpcio >= 1.81: segfault at address 0)."""

    def __init__(
        self,
        method: str,
        request_id: str,
        context: grpc.aio.ServicerContext,
        metrics: CallMetrics | None = None,
    ) -> None:
        self.method = method
        self.metrics = metrics
        self.token = request_id_var.set(request_id)
        self.peer = context.peer()
        self.t0 = time.perf_counter()
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        if metrics is not None:
            metrics.started(method)

    def end(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        code = context.code()  # the status grpc will send (None: OK unless an error escapes)
        outcome = getattr(code, "name", None) or ("OK" if error is None else "ERROR")
        if isinstance(error, asyncio.CancelledError) and outcome in ("OK", "ERROR"):
            outcome = "CANCELLED"  # the client went away, or its deadline passed
        elif error is not None and outcome == "OK":
            outcome = type(error).__name__
        seconds = time.perf_counter() - self.t0
        log.info("rpc %s %s %.3fs peer=%s", self.method, outcome, seconds, self.peer)
        request_id_var.reset(self.token)
        if self.metrics is not None:
            self.metrics.ended(self.method, outcome, seconds)


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Assigns the request id, returns it in metadata, logs one line per call (and counts it in
    `metrics`, if given); a request that does not parse is INVALID_ARGUMENT. Its handler is the
    outermost one, the one grpc runs."""

    def __init__(self, metrics: CallMetrics | None = None) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler  # client/bidi streaming (reflection): passed through as it is
        given = _metadata(details).get(REQUEST_ID_KEY, "")
        request_id = given if _SANE_ID.match(given) else uuid.uuid4().hex
        method = details.method
        streaming = handler.unary_stream is not None
        behaviour = handler.unary_stream if streaming else handler.unary_unary

        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _CallLog(method, request_id, context, self.metrics)
            error: BaseException | None = None
            try:
                await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
                if isinstance(request, Undecodable) and behaviour is not _refuse:
                    await _reject_undecodable(context, request)
                if streaming:
                    return await _write_stream(behaviour, request, context)
                return await behaviour(request, context)
            except grpc.aio.InternalError as exc:
                # a send the core could not carry out: the client has gone and the call's
                # cancellation has not reached us yet. End as cancelled, as the call is (left to
                # grpc, it is logged as an error, with a traceback).
                error = exc
                raise asyncio.CancelledError("the client went away") from exc
            except BaseException as exc:
                error = exc
                raise
            finally:
                call.end(context, error)

        # the outermost handler's deserializer is the one grpc calls
        return _like(handler, run, _tolerant(handler.request_deserializer))


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    """AuthInterceptor's answer to a call without a valid token; it never reads the message,
    so a caller without a token learns nothing about what it sent."""
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid bearer token (metadata `authorization: Bearer <token>`)",
        trailing_metadata=((REQUEST_ID_KEY, request_id_var.get()),),
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens in `authorization` metadata; the health service stays open."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in tokens if t]

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        header = _metadata(details).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        # compare with every token (no early exit) so timing says nothing about which matched
        return bool(sum(hmac.compare_digest(given, t) for t in self._tokens))

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or not self._tokens:
            return handler
        if details.method.startswith(HEALTH_PREFIX) or self._allowed(details):
            return handler
        return _like(handler, _refuse)
