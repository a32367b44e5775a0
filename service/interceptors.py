"""Cross-cutting concerns of every call: request ids, structured logs, bearer-token auth.

- Request id: taken from the `x-request-id` metadata (if it is a sane token) or assigned; it is
  returned in the initial and trailing metadata and put in a context variable that a logging
  filter adds to every log line written while the call runs.
- Auth: with tokens configured, every call except the health service needs
  `authorization: Bearer <token>`; anything else is UNAUTHENTICATED. Tokens are compared in
  constant time.
- A request message that does not parse (corrupt wire format, bad UTF-8 in a string field) is
  INVALID_ARGUMENT with field `request` (grpc would answer UNKNOWN), after auth: an
  unauthenticated caller still gets UNAUTHENTICATED.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

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


def _wrap(
    handler: grpc.RpcMethodHandler,
    around: Callable[..., Any],
    deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler whose behaviour runs inside `around(behaviour, request, context)`;
    `deserializer` replaces the handler's request deserializer."""
    parse = deserializer or handler.request_deserializer
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await around(inner, request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, parse, handler.response_serializer)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async for item in around(inner_stream, request, context, streaming=True):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, parse, handler.response_serializer
        )
    return handler  # client/bidi streaming: not used by this service


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Assigns the request id, returns it in metadata, logs one line per call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        given = _metadata(details).get(REQUEST_ID_KEY, "")
        request_id = given if _SANE_ID.match(given) else uuid.uuid4().hex
        method = details.method

        def begin(context: grpc.aio.ServicerContext) -> tuple[contextvars.Token, float]:
            token = request_id_var.set(request_id)
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            return token, time.perf_counter()

        def end(context: Any, token: contextvars.Token, t0: float, error: Any = None) -> None:
            try:
                code = context.code()
            except Exception:  # older grpc.aio contexts have no code()
                code = None
            outcome = getattr(code, "name", None) or ("OK" if error is None else "ERROR")
            if isinstance(error, BaseException) and outcome == "OK":
                outcome = type(error).__name__
            log.info("rpc %s %s %.3fs peer=%s", method, outcome, time.perf_counter() - t0,
                     context.peer())  # fmt: skip
            request_id_var.reset(token)

        async def around_stream(behaviour, request, context, streaming=True):
            token, t0 = begin(context)
            await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
            error: BaseException | None = None
            try:
                if isinstance(request, Undecodable) and not _denies(behaviour):
                    await _reject_undecodable(context, request)
                async for item in behaviour(request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                end(context, token, t0, error)

        async def around_unary(behaviour, request, context):
            token, t0 = begin(context)
            await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
            error: BaseException | None = None
            try:
                if isinstance(request, Undecodable) and not _denies(behaviour):
                    await _reject_undecodable(context, request)
                return await behaviour(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                end(context, token, t0, error)

        def dispatch(behaviour, request, context, streaming=False):
            if streaming:
                return around_stream(behaviour, request, context)
            return around_unary(behaviour, request, context)

        # the outermost handler's deserializer is the one grpc calls
        return _wrap(handler, dispatch, _tolerant(handler.request_deserializer))


def _denies(behaviour: Any) -> bool:
    """The behaviour is AuthInterceptor's refusal (which never reads the message)."""
    return bool(getattr(behaviour, "unmask_denies", False))


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
        if not self._tokens or details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        if self._allowed(details):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return handler

        async def deny(behaviour, request, context, streaming=False):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token (metadata `authorization: Bearer <token>`)",
                trailing_metadata=((REQUEST_ID_KEY, request_id_var.get()),),
            )

        async def deny_stream(behaviour, request, context, streaming=True):
            await deny(behaviour, request, context)
            yield  # pragma: no cover - abort raised

        def dispatch(behaviour, request, context, streaming=False):
            if streaming:
                return deny_stream(behaviour, request, context)
            return deny(behaviour, request, context)

        denied = _wrap(handler, dispatch)
        for fn in (denied.unary_unary, denied.unary_stream):
            if fn is not None:
                fn.unmask_denies = True  # type: ignore[attr-defined]
        return denied
