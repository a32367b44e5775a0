"""The HTTP gateway (`unmask gateway`, or `unmask serve --http-port`): JSON and SSE over HTTP,
translated onto the gRPC API. Torch-free.

Every route is one gRPC call (or stream) made with `unmask.client.AsyncClient`: no second
request path. The caller's `Authorization: Bearer` token and `x-request-id` travel on as gRPC
metadata (the gateway's own `--token` is used when a caller sends none; the request id, given
or assigned, comes back in the `x-request-id` header). A gRPC status becomes an HTTP status
through one table, `HTTP_STATUS`, with the same message and the field at fault in an
OpenAI-style body `{"error": {"message", "type", "param", "code"}}`. A caller that goes away
cancels its call, and so its job. Routes and deviations from OpenAI: docs/http_api.md.

Starlette + uvicorn: a small, well-kept ASGI toolkit and server (Starlette is what FastAPI is
built on) that give routing, streaming responses and static files without a schema layer we
would not use (the proto is the schema).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from unmask.client import (
    AsyncClient,
    ServiceError,
    jsonl_rows,
    midi_request,
    request_from_json,
    template_segments,
)
from unmask.errors import InvalidArgument, UnmaskError
from unmask.service import openai_compat as oai
from unmask.service.interceptors import request_id_var
from unmask.v1 import unmask_pb2 as pb

log = logging.getLogger("unmask.service.http")

PLAYGROUND = Path(__file__).resolve().parent / "playground"
REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # what the gRPC server accepts as an id

# gRPC status name -> (HTTP status, OpenAI error type): the one place statuses are chosen
HTTP_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "METHOD_NOT_ALLOWED": (405, "invalid_request_error"),  # HTTP only: a route's wrong method
    "ALREADY_EXISTS": (409, "conflict_error"),
    "ABORTED": (409, "conflict_error"),
    "FAILED_PRECONDITION": (409, "failed_precondition_error"),
    "REQUEST_TOO_LARGE": (413, "invalid_request_error"),  # HTTP only: the body's size
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled_error"),
    "UNIMPLEMENTED": (501, "not_implemented_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "INTERNAL": (500, "server_error"),
    "UNKNOWN": (500, "server_error"),
    "DATA_LOSS": (500, "server_error"),
}
OWN_FAMILIES = ("unmask",)  # models without a chat template: chat is flattened by the gateway
_HTTP_CODE = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE"}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def error_response(exc: BaseException, param: Callable[[str | None], str | None] = str) -> Response:
    """Any exception → its HTTP status and `{"error": {...}}` body (the message as the server
    wrote it; `param` the field at fault, as the route names it). Not ours: 500, logged."""
    if isinstance(exc, UnmaskError):
        code = exc.code
        message = exc.message if isinstance(exc, ServiceError) else str(exc)
        field = param(exc.field) if exc.field else None
    elif isinstance(exc, HTTPException):
        code = _HTTP_CODE.get(exc.status_code, "INVALID_ARGUMENT")
        message, field = str(exc.detail), None
    else:
        log.exception("unexpected error")
        code, message, field = "INTERNAL", f"internal error ({type(exc).__name__})", None
    status, kind = HTTP_STATUS.get(code, HTTP_STATUS["INTERNAL"])
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"message": message, "type": kind, "param": field, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ClientGone(Exception):
    """The HTTP caller disconnected before its answer was ready."""


async def until_gone(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (and so its gRPC call and job) if the caller disconnects."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


def _json_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)  # fmt: skip


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "").lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise InvalidArgument("true or false", field=name, value=value)
    return value in ("1", "true", "yes")


def _int_query(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise InvalidArgument("a whole number", field=name, value=raw) from None
    if value < 0:
        raise InvalidArgument("must be >= 0", field=name, value=value)
    return value


class Gateway:
    """The routes, over one gRPC channel shared by every HTTP request."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None,
                 server_name: str | None = None, timeout: float | None = None,
                 max_body_bytes: int = 32 << 20) -> None:  # fmt: skip
        self.target = target
        self._client_kwargs = {"token": token, "tls": tls, "root_certificates": root_certificates,
                               "server_name": server_name, "timeout": timeout}  # fmt: skip
        self.max_body_bytes = max_body_bytes
        self.client: AsyncClient | None = None
        self._default_model = ""
        self._chat_template: dict[str, bool] = {}  # model name -> renders chat with its own

    # ---- plumbing ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.client = AsyncClient(self.target, **self._client_kwargs)  # type: ignore[arg-type]
        try:
            yield
        finally:
            await self.client.close()

    def caller(self, request: Request) -> AsyncClient:
        """The shared client, calling with this request's token and request id."""
        assert self.client is not None, "the gateway's lifespan has not started"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" and token.strip() else None
        return self.client.with_identity(token=given, request_id=request.state.request_id)

    async def body(self, request: Request) -> bytes:
        data = await request.body()
        if len(data) > self.max_body_bytes:
            raise UnmaskError(f"the body is over {self.max_body_bytes} bytes", field="body",
                              code="REQUEST_TOO_LARGE")  # fmt: skip
        return data

    async def json(self, request: Request) -> Any:
        data = await self.body(request)
        try:
            return json.loads(data or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"not JSON: {exc}", field="body") from None

    async def default_model(self, client: AsyncClient) -> str:
        if not self._default_model:
            self._default_model = (await client.get_model("")).name
        return self._default_model

    async def has_chat_template(self, client: AsyncClient, model: str) -> bool:
        """Whether `model` renders chat with its checkpoint's own template: the public families
        do (llada, dream, sdar, ...), our own model (family `unmask`) has none. Asked once per
        model name (GetModel); not kept while unknown (a Celery model with no live worker
        reports no family) or when GetModel fails (the Generate call then says why)."""
        if model not in self._chat_template:
            try:
                family = (await client.get_model(model)).family
            except ServiceError:
                return False
            if not family:
                return False
            self._chat_template[model] = family not in OWN_FAMILIES
        return self._chat_template[model]

    async def events(self, request: Request, client: AsyncClient, msg: pb.GenerateRequest,
                     render: Callable[[pb.GenerateEvent], AsyncIterator[bytes]],
                     end: bytes = b"") -> Response:  # fmt: skip
        """A GenerateStream as SSE. The first event is awaited before the response starts, so
        a refused request gets its HTTP status; a later error is an `error` event. The stream
        (and the job) is cancelled when the caller disconnects."""
        stream = client.call_stream("GenerateStream", msg)
        first = await until_gone(request, anext(stream))

        async def body() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(stream):
                try:
                    async for piece in render(first):
                        yield piece
                    async for event in stream:
                        async for piece in render(event):
                            yield piece
                except UnmaskError as exc:
                    err = json.loads(error_response(exc).body)
                    yield _sse(err, "error")
                    return
                if end:
                    yield end

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    # ---- unmask's own ------------------------------------------------------------------------
    async def generate(self, request: Request) -> Response:
        return await self._run(request, request_from_json(await self.json(request)))

    async def infill(self, request: Request) -> Response:
        body = await self.json(request)
        if isinstance(body, dict) and isinstance(body.get("segments"), list):
            segs = body.pop("segments")
            if all(isinstance(s, str | int) and not isinstance(s, bool) for s in segs):
                segs = [json_format.MessageToDict(s) for s in template_segments(segs)]
            body["infill"] = {"segments": segs}
        if not isinstance(body, dict) or not ({"template", "infill"} & set(body)):
            raise InvalidArgument("give a `template` with [MASK:n] gaps, or `segments`",
                                  field="template")  # fmt: skip
        msg = request_from_json(body)
        if msg.modality == pb.MODALITY_MIDI:
            raise InvalidArgument("MIDI bars are rewritten by POST /v1/midi (midi_b64 + bars)",
                                  field="modality")  # fmt: skip
        return await self._run(request, msg)

    async def midi(self, request: Request) -> Response:
        body = await self.json(request)
        allowed = {"model", "time_signature", "tempo", "programs", "voices", "bars", "tracks",
                   "midi_b64", "params"}  # fmt: skip
        if not isinstance(body, dict):
            raise InvalidArgument("must be a JSON object", field="body")
        for key, value in body.items():
            if key not in allowed:
                raise InvalidArgument(f"unknown field; allowed: {', '.join(sorted(allowed))}",
                                      field=key)  # fmt: skip
            if value is not None and not _MIDI_FIELD_TYPES.get(key, lambda v: True)(value):
                raise InvalidArgument("wrong type", field=key, value=value)
        midi = None
        if body.get("midi_b64"):
            try:
                midi = base64.b64decode(body["midi_b64"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise InvalidArgument("not base64", field="midi_b64") from None
        bars = body.get("bars")
        if isinstance(bars, list) and not midi:
            raise InvalidArgument("a list of bars to rewrite needs midi_b64", field="bars")
        try:
            msg = midi_request(
                midi, bars=bars if isinstance(bars, list) else None, tracks=body.get("tracks"),
                time_signature=body.get("time_signature") or "", tempo=body.get("tempo") or 0.0,
                programs=body.get("programs") or (), voices=body.get("voices") or 0,
                n_bars=bars if isinstance(bars, int) and not isinstance(bars, bool) else 0,
                model=body.get("model") or "", params=body.get("params") or {},
            )  # fmt: skip
        except (TypeError, ValueError) as exc:  # a wrong type in a settings field
            raise InvalidArgument(f"wrong type: {exc}", field="body") from None
        if _flag(request, "stream") or request.query_params.get("format") == "json":
            return await self._run(request, msg)
        r = await until_gone(request, self.caller(request).call("Generate", msg))
        usage = json.dumps(json_format.MessageToDict(r.usage, preserving_proto_field_name=True))
        return Response(r.midi, media_type="audio/midi", headers={
            "content-disposition": f'attachment; filename="{r.job_id}.mid"',
            "x-unmask-job-id": r.job_id, "x-unmask-usage": usage,
        })  # fmt: skip

    async def _run(self, request: Request, msg: pb.GenerateRequest) -> Response:
        """Generate → the GenerateResponse as JSON; `?stream=true`: GenerateStream as SSE, one
        event per GenerateEvent (event name: accepted | step | block | final)."""
        client = self.caller(request)
        if _flag(request, "stream"):

            async def render(e: pb.GenerateEvent) -> AsyncIterator[bytes]:
                kind = e.WhichOneof("event")
                yield _sse(_json_dict(getattr(e, kind)), kind)

            return await self.events(request, client, msg, render)
        return JSONResponse(_json_dict(await until_gone(request, client.call("Generate", msg))))

    # ---- OpenAI-compatible ---------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._openai(request, oai.completion_call(await self.json(request)))

    async def chat(self, request: Request) -> Response:
        """A model with its own chat template gets the messages as the gRPC `chat` input (the
        server renders them); ours gets them flattened (`oai.render_chat`)."""
        body = await self.json(request)
        call = oai.chat_call(body)
        client = self.caller(request)
        call.model = call.model or await until_gone(request, self.default_model(client))
        if await until_gone(request, self.has_chat_template(client, call.model)):
            call = dataclasses.replace(oai.chat_call(body, template=True), model=call.model)
        return await self._openai(request, call)

    async def _openai(self, request: Request, call: oai.Call) -> Response:
        client = self.caller(request)
        call.model = call.model or await until_gone(request, self.default_model(client))
        if not call.stream:
            r = await until_gone(request, client.call("Generate", call.request))
            return JSONResponse(oai.response(call, r))
        deltas = oai.Deltas(call)
        state = {"first": True}

        async def render(e: pb.GenerateEvent) -> AsyncIterator[bytes]:
            kind = e.WhichOneof("event")
            if kind == "accepted":
                state["job_id"] = e.accepted.job_id
                if call.kind == "chat":  # the role first, as OpenAI does
                    yield _sse(oai.chunk(call, e.accepted.job_id, "", first=True))
                return
            text = (deltas.block(e.block.text) if kind == "block"
                    else deltas.finish(e.final.text) if kind == "final" else "")  # fmt: skip
            if text:
                yield _sse(oai.chunk(call, state.get("job_id", ""), text))
            if kind == "final":
                yield _sse(oai.chunk(call, e.final.job_id, finish=oai.finish_reason(e.final)))
                if call.include_usage:
                    yield _sse(oai.usage_chunk(call, e.final))

        return await self.events(request, client, call.request, render, b"data: [DONE]\n\n")

    async def models(self, request: Request) -> Response:
        cards = await until_gone(request, self.caller(request).list_models())
        return JSONResponse({"object": "list", "data": [self._model(c) for c in cards]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        return JSONResponse(self._model(await self.caller(request).get_model(name)))

    @staticmethod
    def _model(card: Any) -> dict[str, Any]:
        return {"id": card.name, "object": "model", "created": 0, "owned_by": "unmask",
                **{k: v for k, v in dataclasses.asdict(card).items() if k != "name"}}  # fmt: skip

    # ---- batches -----------------------------------------------------------------------------
    async def submit_batch(self, request: Request) -> Response:
        data = await self.body(request)
        key = request.headers.get("idempotency-key") or request.query_params.get(
            "idempotency_key", ""
        )
        model = request.query_params.get("model", "")
        rows = _batch_rows(data)
        if isinstance(rows, dict):  # {"items": [...], "idempotency_key", "model"}
            extra = set(rows) - {"items", "idempotency_key", "model"}
            if extra:
                raise InvalidArgument("allowed: items, idempotency_key, model",
                                      field=sorted(extra)[0])  # fmt: skip
            key = rows.get("idempotency_key") or key
            model = rows.get("model") or model
            rows = rows.get("items")
        if not isinstance(rows, list) or not rows:
            raise InvalidArgument("give at least one {custom_id, body} item", field="items")
        client = self.caller(request)
        job = await client.submit_batch(rows, idempotency_key=key, model=model)
        return JSONResponse(_batch(job))

    async def get_batch(self, request: Request) -> Response:
        return JSONResponse(_batch(await self.caller(request).get_batch(request.path_params["id"])))

    async def list_batches(self, request: Request) -> Response:
        jobs, token = await self.caller(request).list_batches(
            _int_query(request, "page_size", 20), request.query_params.get("page_token", "")
        )
        return JSONResponse({"object": "list", "data": [_batch(j) for j in jobs],
                             "next_page_token": token})  # fmt: skip

    async def cancel_batch(self, request: Request) -> Response:
        job = await self.caller(request).cancel_batch(request.path_params["id"])
        return JSONResponse(_batch(job))

    async def batch_results(self, request: Request) -> Response:
        """Item results as JSONL (`?follow=true`: until the batch is done; `?offset=N`)."""
        client = self.caller(request)
        batch_id = request.path_params["id"]
        await client.get_batch(batch_id)  # an unknown id is a 404, before any line is sent
        rows = client.batch_results(batch_id, follow=_flag(request, "follow"),
                                    offset=_int_query(request, "offset", 0))  # fmt: skip

        async def lines() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(rows):
                try:
                    async for row in rows:
                        yield (json.dumps(row) + "\n").encode()
                except UnmaskError as exc:  # the status line is sent: the error is the last line
                    yield (json.dumps(json.loads(error_response(exc).body)) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/jsonl")

    # ---- health and the playground -------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        try:
            status = await self.caller(request).health(timeout=5.0)
        except ServiceError as exc:
            return JSONResponse({"status": "UNREACHABLE", "message": exc.message},
                                status_code=503)  # fmt: skip
        return JSONResponse({"status": status}, status_code=200 if status == "SERVING" else 503)

    async def pieces(self, request: Request) -> Response:
        """Each token id's text as the live views draw it (the playground's canvas)."""
        from unmask.service.live_view import all_pieces

        return JSONResponse({"pieces": all_pieces()},
                            headers={"cache-control": "public, max-age=3600"})  # fmt: skip

    async def index(self, request: Request) -> Response:
        page = PLAYGROUND / "index.html"
        if page.is_file():
            return FileResponse(page)
        return HTMLResponse(FALLBACK_PAGE)


FALLBACK_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>unmask</title></head>
<body><h1>unmask HTTP gateway</h1><p>The playground is not installed here. The API is described
in <code>docs/http_api.md</code> of the unmask repository; try <a href="/v1/models">/v1/models</a>
or <a href="/healthz">/healthz</a>.</p></body></html>
"""


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(type(x) is int and x >= 0 for x in value)


_MIDI_FIELD_TYPES: dict[str, Callable[[Any], bool]] = {
    "model": lambda v: isinstance(v, str),
    "time_signature": lambda v: isinstance(v, str),
    "tempo": lambda v: type(v) in (int, float) and v >= 0,
    "programs": _ints,
    "voices": lambda v: type(v) is int and v >= 0,
    "bars": lambda v: (type(v) is int and v >= 0) or _ints(v),
    "tracks": _ints,
    "midi_b64": lambda v: isinstance(v, str),
    "params": lambda v: isinstance(v, dict),
}


def _batch(job: Any) -> dict[str, Any]:
    return {"object": "batch", **dataclasses.asdict(job)}


def _batch_rows(data: bytes) -> Any:
    """A JSON list (or {"items": [...]}) or JSONL: one {custom_id, body} per line."""
    text = data.decode("utf-8", errors="replace").strip()
    try:
        whole = json.loads(text) if text.startswith(("[", "{")) else None
    except json.JSONDecodeError as exc:
        if text.startswith("["):
            raise InvalidArgument(f"not JSON: {exc}", field="body") from None
        whole = None  # JSONL: one object per line
    if isinstance(whole, list) or (isinstance(whole, dict) and "items" in whole):
        return whole
    return jsonl_rows(text.splitlines(), lambda n: f"line {n}")


# ---- the application -----------------------------------------------------------------------


def _route(handler: Callable[[Request], Awaitable[Response]],
           param: Callable[[str | None], str | None] = str) -> Callable[[Request], Any]:  # fmt: skip
    """A handler whose errors become HTTP error bodies (the one mapping, `error_response`)."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientGone:
            return Response(status_code=499)
        except Exception as exc:
            return error_response(exc, param)

    return endpoint


class RequestIds:
    """ASGI middleware: the request id (the caller's `x-request-id` when sane, else a new one)
    in `request.state`, the log context and the response header; one log line per request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = ""
        for key, value in scope.get("headers") or ():
            if key == b"x-request-id":
                given = value.decode("latin-1")
        request_id = given if _SANE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        t0, status = time.perf_counter(), [0]

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode())]  # fmt: skip
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("http %s %s %s %.3fs", scope["method"], scope["path"], status[0],
                     time.perf_counter() - t0)  # fmt: skip
            request_id_var.reset(token)


def create_app(target: str, **kwargs: Any) -> Starlette:
    """The gateway's ASGI app for the gRPC server at `target` (kwargs: see `Gateway`)."""
    g = Gateway(target, **kwargs)
    completions = _route(g.completions, lambda f: oai.param_of(f, "completions"))
    routes = [
        Route("/", _route(g.index)),
        Route("/healthz", _route(g.healthz)),
        Route("/v1/pieces", _route(g.pieces)),
        Route("/v1/completions", completions, methods=["POST"]),
        Route(
            "/v1/chat/completions",
            _route(g.chat, lambda f: oai.param_of(f, "chat")),
            methods=["POST"],
        ),  # fmt: skip
        Route("/v1/models", _route(g.models)),
        Route("/v1/models/{name:path}", _route(g.model)),
        Route("/v1/generate", _route(g.generate), methods=["POST"]),
        Route("/v1/infill", _route(g.infill), methods=["POST"]),
        Route("/v1/midi", _route(g.midi), methods=["POST"]),
        Route("/v1/batches", _route(g.submit_batch), methods=["POST"]),
        Route("/v1/batches", _route(g.list_batches), methods=["GET"]),
        Route("/v1/batches/{id}", _route(g.get_batch)),
        Route("/v1/batches/{id}/cancel", _route(g.cancel_batch), methods=["POST"]),
        Route("/v1/batches/{id}/results", _route(g.batch_results)),
        Mount("/static", StaticFiles(directory=PLAYGROUND, check_dir=False), name="static"),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    app = Starlette(routes=routes, lifespan=g.lifespan,
                    exception_handlers={HTTPException: http_error})  # fmt: skip
    app.add_middleware(RequestIds)  # type: ignore[arg-type]
    app.state.gateway = g
    return app


# ---- serving -------------------------------------------------------------------------------


def listen(host: str, port: int, flag: str = "--port") -> socket.socket:
    """A bound socket, or one line naming the flag (a port in use, an address not ours)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidArgument(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                              field=flag) from None  # fmt: skip
    sock.listen(128)
    sock.setblocking(False)
    return sock


class HttpServer:
    """uvicorn serving the gateway on a socket bound beforehand (so a port in use is refused
    before any work starts), as a task on the running loop: alone (`unmask gateway`) or beside
    the gRPC server (`unmask serve --http-port`). Signals are left to whoever runs the loop."""

    def __init__(self, sock: socket.socket, app: Starlette) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:  # the caller's handlers stay
                yield

        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)  # fmt: skip
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> int:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="unmask-http")
        while not self.server.started:
            if self.task.done():  # failed to start: its exception, if any
                self.task.result()
                raise UnmaskError("the HTTP server did not start", field="http_port")
            await asyncio.sleep(0.01)
        log.info("HTTP gateway on http://%s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError, SystemExit, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), 10)
        self.sock.close()


class EmbeddedGateway:
    """`unmask serve --http-port`: the gateway in the server's process and event loop, calling
    it over loopback. The port is bound at construction, before the server starts."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.sock = listen(settings.host, settings.http_port, "--http-port")
        self.http: HttpServer | None = None

    async def start(self, grpc_port: int) -> int:
        s = self.settings
        app = create_app(local_target(s.host, grpc_port), root_certificates=s.tls_cert or None,
                         max_body_bytes=2 * s.max_message_bytes)  # fmt: skip
        self.http = HttpServer(self.sock, app)
        return await self.http.start()

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop()
        self.sock.close()


async def run_gateway(target: str, host: str, port: int, **kwargs: Any) -> None:
    """`unmask gateway`: serve until SIGINT/SIGTERM."""
    import signal

    http = HttpServer(listen(host, port), create_app(target, **kwargs))
    await http.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(stop.wait())
    assert http.task is not None
    await asyncio.wait({waiter, http.task}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    await http.stop()


def local_target(host: str, port: int) -> str:
    """How a process on this machine reaches a server listening on host:port."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return f"127.0.0.1:{port}"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
