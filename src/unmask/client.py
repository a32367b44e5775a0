"""A Python client for the unmask gRPC service (sync and asyncio) that hides the stubs.

    from unmask.client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("Once upon a time", gen_length=64, seed=1).text)
        for event in c.stream("def add(a, b):", modality="code"):
            ...                                    # {"type": "accepted"|"step"|"block"|"final"}
        c.infill("The [MASK:4] sat on the [MASK:3].")
        open("new.mid", "wb").write(c.midi(time_signature="3/4", voices=2, bars=4).midi)
        job = c.submit_batch([{"custom_id": "a", "body": {"prompt": "Hi"}}])
        c.wait_batch(job.id); rows = list(c.batch_results(job.id))

`AsyncClient` has the same methods as coroutines (`stream` and `batch_results` are async
iterators). Sampler parameters are keyword arguments named as in `SamplerParams`
(gen_length, steps, block_length, threshold, position_score, temperature, top_k, top_p,
remask_budget, remask_threshold, use_cache, max_steps, seed, stop_at_eos, grammar,
speculative).

Errors are `ServiceError` (an `UnmaskError`) with the gRPC status name in `.code`, the request
field at fault in `.field` and the server's request id in `.request_id`. Torch-free.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from unmask.errors import InvalidArgument, UnmaskError
from unmask.v1 import unmask_pb2 as pb
from unmask.v1 import unmask_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
REQUEST_ID_KEY = "x-request-id"
FIELD_KEY = "unmask-field"

_MODALITY = {"text": pb.MODALITY_TEXT, "code": pb.MODALITY_CODE, "midi": pb.MODALITY_MIDI}
_MODALITY_NAME = {v: k for k, v in _MODALITY.items()}
_BATCH_STATUS = {
    pb.BATCH_STATUS_RUNNING: "running",
    pb.BATCH_STATUS_CANCELLING: "cancelling",
    pb.BATCH_STATUS_COMPLETED: "completed",
    pb.BATCH_STATUS_CANCELLED: "cancelled",
}
_PARAM_ALIASES = {"use_cache": "cache", "length": "gen_length"}
_PARAM_FIELD = {"cache": "use_cache"}  # proto SamplerParams field -> SamplerParams field


class ServiceError(UnmaskError):
    """A call the server refused or a job that failed."""

    def __init__(self, message: str, *, code: str, field: str | None = None,
                 request_id: str = "") -> None:  # fmt: skip
        super().__init__(message, field=field)
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# ---- results ---------------------------------------------------------------------------------


@dataclass
class Generation:
    job_id: str
    modality: str
    text: str = ""
    midi: bytes = b""  # a standard MIDI file for modality "midi"
    usage: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # what it ran with (resend to repeat)
    tokens: list[list[Any]] = field(default_factory=list)  # [position, id, confidence]
    samples: list[Generation] = field(default_factory=list)  # n > 1: every sample

    @property
    def output(self) -> str | bytes:
        return self.midi if self.modality == "midi" else self.text


@dataclass
class BatchJob:
    id: str
    status: str  # running | cancelling | completed | cancelled
    counts: dict[str, int]
    model: str = ""
    idempotency_key: str = ""
    created_at: float = 0.0
    finished_at: float = 0.0
    note: str = ""  # why items wait longer than usual (GetJob), e.g. a lost worker

    @property
    def done(self) -> bool:
        return self.status in ("completed", "cancelled")


@dataclass
class ModelCard:
    name: str
    ready: bool
    dispatcher: str
    live_workers: int
    queue_length: int
    max_seq_len: int
    architecture: str
    modalities: list[str]
    family: str = ""  # unmask | llada | dream | fast_dllm_v2 | sdar
    parameters: int = 0
    dtype: str = ""
    mask_id: int = 0
    attention: str = ""  # full | block_causal | causal
    block_size: int = 0
    content_hash: str = ""


def _usage(u: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens, "generated_tokens": u.generated_tokens, "nfe": u.nfe,
        "steps": u.steps, "tokens_per_forward": round(u.tokens_per_forward, 3),
        "latency_s": round(u.latency_s, 4), "finish_reason": u.finish_reason,
    }  # fmt: skip


def generation_from_proto(r: pb.GenerateResponse) -> Generation:
    params = {_PARAM_FIELD.get(d.name, d.name): getattr(r.params, d.name)
              for d in r.params.DESCRIPTOR.fields if r.params.HasField(d.name)}  # fmt: skip
    return Generation(r.job_id, _MODALITY_NAME.get(r.modality, ""), r.text, r.midi,
                      _usage(r.usage), params, _tokens(r.tokens),
                      [generation_from_proto(x) for x in r.samples])  # fmt: skip


def _tokens(tokens: Iterable[pb.Token]) -> list[list[Any]]:
    return [[t.position, t.id, round(t.confidence, 4)] for t in tokens]


def event_from_proto(e: pb.GenerateEvent) -> dict[str, Any]:
    """As the Engine emits them; the final event holds `generation`."""
    kind = e.WhichOneof("event")
    if kind == "accepted":
        return {"type": "accepted", "job_id": e.accepted.job_id}
    if kind == "step":
        s = e.step
        return {"type": "step", "step": s.step, "block": s.block,
                "committed": _tokens(s.committed), "tentative": _tokens(s.tentative),
                "remasked": list(s.remasked)}  # fmt: skip
    if kind == "block":
        return {"type": "block", "index": e.block.index, "text": e.block.text,
                "ids": list(e.block.ids)}  # fmt: skip
    return {"type": "final", "generation": generation_from_proto(e.final)}


def batch_from_proto(b: pb.BatchJob) -> BatchJob:
    c = b.counts
    counts = {"total": c.total, "succeeded": c.succeeded, "failed": c.failed,
              "cancelled": c.cancelled, "pending": c.pending}  # fmt: skip
    return BatchJob(b.id, _BATCH_STATUS.get(b.status, "unknown"), counts, b.model,
                    b.idempotency_key, b.created_at, b.finished_at, b.note)  # fmt: skip


def item_from_proto(r: pb.BatchItemResult) -> dict[str, Any]:
    """One JSONL output row: {custom_id, status, response, error}."""
    row: dict[str, Any] = {"custom_id": r.custom_id, "status": r.status, "response": None,
                           "error": None}  # fmt: skip
    if r.HasField("response"):
        g = generation_from_proto(r.response)
        row["response"] = {"job_id": g.job_id, "modality": g.modality, "text": g.text,
                           "usage": g.usage}  # fmt: skip
        if g.midi:
            row["response"]["midi_b64"] = base64.b64encode(g.midi).decode()
    if r.HasField("error"):
        e = r.error
        row["error"] = {"code": e.code, "type": e.type, "field": e.field or None,
                        "message": e.message}  # fmt: skip
    return row


def model_from_proto(m: pb.Model) -> ModelCard:
    return ModelCard(m.name, m.ready, m.dispatcher, m.live_workers, m.queue_length, m.max_seq_len,
                     m.architecture, [_MODALITY_NAME.get(x, "") for x in m.modalities],
                     m.family, m.parameters, m.dtype, m.mask_id, m.attention, m.block_size,
                     m.content_hash)  # fmt: skip


# ---- requests ------------------------------------------------------------------------------


def sampler_params(params: Any = None, **knobs: Any) -> pb.SamplerParams:
    """Keyword knobs (or a SamplerParams / dict) → proto; None values are left unset."""
    values: dict[str, Any] = {}
    if params is not None:
        given = dict(params) if isinstance(params, dict) else params.to_dict()
        for name in given.pop("unset", ()) or ():  # left for the model to choose
            given.pop(name, None)
        values.update(given)
    values.update(knobs)
    out = pb.SamplerParams()
    fields = out.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        name = _PARAM_ALIASES.get(key, key)
        if name not in fields:
            raise InvalidArgument(
                f"unknown sampler parameter; allowed: {', '.join(sorted(fields))}", field=key
            )
        if value is None:
            continue
        if isinstance(value, bool) != (fields[name].type == fields[name].TYPE_BOOL):
            raise InvalidArgument(f"wrong type {type(value).__name__}", field=key, value=value)
        try:
            setattr(out, name, value)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(str(exc), field=key, value=value) from None
    return out


def _modality(modality: str) -> int:
    if modality not in _MODALITY:
        raise InvalidArgument("must be text, code or midi", field="modality", value=modality)
    return _MODALITY[modality]


def template_segments(template: str | Iterable[str | int]) -> list[pb.Segment]:
    """'a [MASK:5] b' or ['a ', 5, ' b'] → segments (ints are gaps of that many tokens)."""
    from unmask.models.template import parse_template

    if isinstance(template, str):
        parts: list[Any] = parse_template(template)
    elif isinstance(template, Iterable) and not isinstance(template, dict | bytes | bytearray):
        parts = list(template)
    else:  # e.g. JSON null or a number through the HTTP gateway or a batch line
        raise InvalidArgument("must be a string with [MASK:n] gaps, or a list of strings and "
                              "gap sizes", field="template", value=type(template).__name__)  # fmt: skip
    segments = []
    for p in parts:
        if isinstance(p, str):
            segments.append(pb.Segment(text=p))
        elif isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 2**32:
            segments.append(pb.Segment(mask=p))
        else:
            raise InvalidArgument("each part must be a string or a gap size (an int >= 0)",
                                  field="template", value=repr(p)[:40])  # fmt: skip
    return segments


def generate_request(prompt: str | bytes = "", *, modality: str = "text", model: str = "",
                     params: Any = None, stop: Iterable[str] = (), n: int = 0,
                     return_tokens: bool = False, **knobs: Any) -> pb.GenerateRequest:  # fmt: skip
    """`stop`: strings that end a text/code output; `n`: samples (Generate only);
    `return_tokens`: each generated token and its confidence in the response."""
    msg = pb.GenerateRequest(model=model, modality=_modality(modality),
                             params=sampler_params(params, **knobs), stop=list(stop), n=n,
                             return_tokens=return_tokens)  # fmt: skip
    if isinstance(prompt, bytes):
        msg.midi = prompt
    else:
        msg.prompt = prompt
    return msg


def chat_request(messages: Iterable[tuple[str, str] | dict[str, str]], *, modality: str = "text",
                 model: str = "", params: Any = None, stop: Iterable[str] = (),
                 return_tokens: bool = False, **knobs: Any) -> pb.GenerateRequest:  # fmt: skip
    """A conversation, (role, content) pairs or {"role", "content"} dicts, for a model with a
    chat template; the answer is the assistant's next turn."""
    msgs = [pb.ChatMessage(role=m["role"], content=m["content"]) if isinstance(m, dict)
            else pb.ChatMessage(role=m[0], content=m[1]) for m in messages]  # fmt: skip
    return pb.GenerateRequest(
        model=model, modality=_modality(modality), params=sampler_params(params, **knobs),
        chat=pb.Chat(messages=msgs), stop=list(stop), return_tokens=return_tokens,
    )  # fmt: skip


def infill_request(template: str | Iterable[str | int], *, modality: str = "text",
                   model: str = "", params: Any = None, n: int = 0, return_tokens: bool = False,
                   **knobs: Any) -> pb.GenerateRequest:  # fmt: skip
    return pb.GenerateRequest(
        model=model, modality=_modality(modality), params=sampler_params(params, **knobs),
        infill=pb.Infill(segments=template_segments(template)), n=n, return_tokens=return_tokens,
    )  # fmt: skip


def midi_request(
    midi: bytes | str | Path | None = None, *, bars: Iterable[int] | None = None,
    tracks: Iterable[int] | None = None, time_signature: str = "", tempo: float = 0.0,
    programs: Iterable[int] = (), voices: int = 0, n_bars: int = 0, model: str = "",
    params: Any = None, **knobs: Any,
) -> pb.GenerateRequest:  # fmt: skip
    """Continue `midi` (a file's bytes or path); with `bars`, rewrite those bars (of `tracks`);
    without a file, a new piece from settings (time signature, tempo, programs or voices,
    n_bars)."""
    msg = pb.GenerateRequest(model=model, modality=pb.MODALITY_MIDI,
                             params=sampler_params(params, **knobs))  # fmt: skip
    data = Path(midi).read_bytes() if isinstance(midi, str | Path) else midi
    if data and bars:
        msg.midi_infill.CopyFrom(
            pb.MidiInfill(midi=data, bars=list(bars), tracks=list(tracks or ()))
        )
    elif data:
        msg.midi = data
    else:
        msg.midi_settings.CopyFrom(pb.MidiSettings(
            time_signature=time_signature, tempo=tempo, programs=list(programs), voices=voices,
            bars=n_bars,
        ))  # fmt: skip
    return msg


def request_from_json(body: dict[str, Any], where: str = "body") -> pb.GenerateRequest:
    """A JSON request (a batch line's `body`) → GenerateRequest. Accepts the proto JSON form and
    a friendlier one: modality "text"/"code"/"midi", `template` with [MASK:n] gaps, `midi_b64`,
    params named as in SamplerParams."""
    if not isinstance(body, dict):
        raise InvalidArgument("must be a JSON object", field=where)
    d = dict(body)
    if isinstance(d.get("modality"), str) and d["modality"].lower() in _MODALITY:
        d["modality"] = pb.Modality.Name(_MODALITY[d["modality"].lower()])
    if "template" in d:
        d["infill"] = {"segments": [json_format.MessageToDict(s, preserving_proto_field_name=True)
                                    for s in template_segments(d.pop("template"))]}  # fmt: skip
    if "midi_b64" in d:
        d["midi"] = d.pop("midi_b64")
    mi = d.get("midi_infill")
    if isinstance(mi, dict) and "midi_b64" in mi:
        d["midi_infill"] = {**mi, "midi": mi["midi_b64"]}
        d["midi_infill"].pop("midi_b64")
    if isinstance(d.get("params"), dict):
        d["params"] = {_PARAM_ALIASES.get(k, k): v for k, v in d["params"].items()}
    try:
        return json_format.ParseDict(d, pb.GenerateRequest())
    except json_format.ParseError as exc:
        raise InvalidArgument(str(exc), field=where) from None


def batch_items(rows: Iterable[dict[str, Any]]) -> list[pb.BatchItem]:
    """OpenAI-Batch-like rows {"custom_id", "body": {...}} ("method"/"url" are ignored; "request"
    is accepted for "body")."""
    items = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("custom_id"):
            raise InvalidArgument("needs a custom_id", field=f"line {n}")
        body = row.get("body", row.get("request"))
        items.append(pb.BatchItem(custom_id=str(row["custom_id"]),
                                  request=request_from_json(body or {}, f"line {n}: body")))  # fmt: skip
    return items


def jsonl_rows(lines: Iterable[str], where: Callable[[int], str]) -> list[Any]:
    """One JSON value per non-blank line; a line that does not parse is named (`where(n)`)."""
    import json

    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"not JSON: {exc}", field=where(n)) from None
    return rows


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return jsonl_rows(f, lambda n: f"{path}:{n}")


# ---- channels --------------------------------------------------------------------------------


@dataclass
class _Conn:
    target: str
    token: str | None
    tls: bool
    root_certificates: bytes | None
    server_name: str | None
    max_message_bytes: int
    timeout: float | None
    request_id: str | None

    def options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_certificates):
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        md = [(REQUEST_ID_KEY, self.request_id or uuid.uuid4().hex)]
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        return tuple(md)

    def deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


def _conn(target, token, tls, root_certificates, server_name, max_message_bytes, timeout,
          request_id) -> _Conn:  # fmt: skip
    if isinstance(root_certificates, str | Path):
        root_certificates = Path(root_certificates).read_bytes()
    return _Conn(target, token, tls, root_certificates, server_name, max_message_bytes, timeout,
                 request_id)  # fmt: skip


def _error(exc: grpc.RpcError) -> ServiceError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    md: dict[str, str] = {}
    for getter in ("trailing_metadata", "initial_metadata"):
        try:
            for key, value in getattr(exc, getter)() or ():
                md.setdefault(key, value if isinstance(value, str) else value.decode())
        except Exception:
            pass
    if code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in (details or ""):
        # what a plaintext client sees from a TLS server (and from a server that went away)
        details += ("; if the server uses TLS, pass its certificate with --ca FILE "
                    "(env UNMASK_TLS_CA); otherwise check that it is running")  # fmt: skip
    return ServiceError(details or code.name, code=code.name, field=md.get(FIELD_KEY),
                        request_id=md.get(REQUEST_ID_KEY, ""))  # fmt: skip


class Client:
    """Synchronous client. `target` is HOST:PORT; `token` a bearer token; `tls` (or
    `root_certificates`: PEM bytes or a path) for TLS; `timeout` the default deadline (s)."""

    def __init__(
        self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: bool = False,
        root_certificates: bytes | str | Path | None = None, server_name: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, timeout: float | None = None,
        request_id: str | None = None,
    ) -> None:  # fmt: skip
        self._c = _conn(target, token, tls, root_certificates, server_name, max_message_bytes,
                        timeout, request_id)  # fmt: skip
        creds = self._c.credentials()
        opts = self._c.options()
        self.channel = (grpc.secure_channel(target, creds, opts) if creds
                        else grpc.insecure_channel(target, opts))  # fmt: skip
        self._stub = pb_grpc.UnmaskStub(self.channel)
        self.last_request_id = ""

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: str, request: Any, timeout: float | None = None) -> Any:
        md = self._c.metadata()
        self.last_request_id = md[0][1]
        try:
            return getattr(self._stub, method)(request, timeout=self._c.deadline(timeout),
                                               metadata=md)  # fmt: skip
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def _stream(self, method: str, request: Any, timeout: float | None = None) -> Iterator[Any]:
        md = self._c.metadata()
        self.last_request_id = md[0][1]
        call = getattr(self._stub, method)(request, timeout=self._c.deadline(timeout), metadata=md)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()  # no-op after the end; stops the job when the caller stops early

    # ---- generation ----
    def run(self, request: pb.GenerateRequest, timeout: float | None = None) -> Generation:
        return generation_from_proto(self._unary("Generate", request, timeout))

    def run_stream(self, request: pb.GenerateRequest,
                   timeout: float | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
        for e in self._stream("GenerateStream", request, timeout):
            yield event_from_proto(e)

    def generate(self, prompt: str | bytes = "", *, modality: str = "text", model: str = "",
                 timeout: float | None = None, **knobs: Any) -> Generation:  # fmt: skip
        return self.run(generate_request(prompt, modality=modality, model=model, **knobs), timeout)

    def stream(self, prompt: str | bytes = "", *, modality: str = "text", model: str = "",
               timeout: float | None = None, **knobs: Any) -> Iterator[dict[str, Any]]:  # fmt: skip
        return self.run_stream(
            generate_request(prompt, modality=modality, model=model, **knobs), timeout
        )

    def infill(self, template: str | Iterable[str | int], *, modality: str = "text",
               model: str = "", timeout: float | None = None, **knobs: Any) -> Generation:  # fmt: skip
        return self.run(infill_request(template, modality=modality, model=model, **knobs), timeout)

    def chat(self, messages: Iterable[tuple[str, str] | dict[str, str]], *, model: str = "",
             timeout: float | None = None, **knobs: Any) -> Generation:  # fmt: skip
        """The assistant's answer, with the model's own chat template (public checkpoints)."""
        return self.run(chat_request(messages, model=model, **knobs), timeout)

    def midi(self, midi: bytes | str | Path | None = None, *, timeout: float | None = None,
             **kwargs: Any) -> Generation:  # fmt: skip
        """See `midi_request`: continue a file, rewrite bars, or start from settings."""
        return self.run(midi_request(midi, **kwargs), timeout)

    # ---- batches ----
    def submit_batch(self, rows: Iterable[dict[str, Any]] | Iterable[pb.BatchItem], *,
                     idempotency_key: str = "", model: str = "") -> BatchJob:  # fmt: skip
        rows = list(rows)
        items = rows if rows and isinstance(rows[0], pb.BatchItem) else batch_items(rows)
        req = pb.SubmitBatchRequest(items=items, idempotency_key=idempotency_key, model=model)
        return batch_from_proto(self._unary("SubmitBatch", req))

    def get_batch(self, batch_id: str) -> BatchJob:
        return batch_from_proto(self._unary("GetJob", pb.GetJobRequest(id=batch_id)))

    def list_batches(self, page_size: int = 20, page_token: str = "") -> tuple[list[BatchJob], str]:
        r = self._unary("ListJobs", pb.ListJobsRequest(page_size=page_size, page_token=page_token))
        return [batch_from_proto(j) for j in r.jobs], r.next_page_token

    def cancel_batch(self, batch_id: str) -> BatchJob:
        return batch_from_proto(self._unary("CancelJob", pb.CancelJobRequest(id=batch_id)))

    def batch_results(self, batch_id: str, *, follow: bool = False,
                      offset: int = 0) -> Iterator[dict[str, Any]]:  # fmt: skip
        req = pb.StreamJobResultsRequest(id=batch_id, follow=follow, offset=offset)
        for r in self._stream("StreamJobResults", req, timeout=None if follow else 600):
            yield item_from_proto(r)

    def wait_batch(self, batch_id: str, *, poll_s: float = 0.25, timeout: float | None = None,
                   on_progress: Any = None) -> BatchJob:  # fmt: skip
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_batch(batch_id)
            if on_progress is not None:
                on_progress(job)
            if job.done:
                return job
            if end is not None and time.monotonic() > end:
                raise ServiceError(f"batch {batch_id} still {job.status} after {timeout}s",
                                   code="DEADLINE_EXCEEDED", field="id")  # fmt: skip
            time.sleep(poll_s)

    # ---- models and health ----
    def list_models(self) -> list[ModelCard]:
        return [
            model_from_proto(m) for m in self._unary("ListModels", pb.ListModelsRequest()).models
        ]

    def get_model(self, name: str = "") -> ModelCard:
        return model_from_proto(self._unary("GetModel", pb.GetModelRequest(name=name)))

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING | NOT_SERVING | SERVICE_UNKNOWN (the standard grpc.health.v1 check)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_ready(self, timeout: float = 60.0, poll_s: float = 0.1) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=min(5.0, timeout)) == "SERVING":
                    return
            except ServiceError:
                pass
            if time.monotonic() > end:
                raise ServiceError(f"{self._c.target} not serving after {timeout}s",
                                   code="UNAVAILABLE")  # fmt: skip
            time.sleep(poll_s)


class AsyncClient:
    """The asyncio twin of `Client` (use `async with AsyncClient(...) as c`)."""

    def __init__(
        self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: bool = False,
        root_certificates: bytes | str | Path | None = None, server_name: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, timeout: float | None = None,
        request_id: str | None = None,
    ) -> None:  # fmt: skip
        self._c = _conn(target, token, tls, root_certificates, server_name, max_message_bytes,
                        timeout, request_id)  # fmt: skip
        creds = self._c.credentials()
        opts = self._c.options()
        self.channel = (grpc.aio.secure_channel(target, creds, opts) if creds
                        else grpc.aio.insecure_channel(target, opts))  # fmt: skip
        self._stub = pb_grpc.UnmaskStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def with_identity(self, *, token: str | None = None,
                      request_id: str | None = None) -> AsyncClient:  # fmt: skip
        """The same channel, calling with another bearer token and/or request id (the HTTP
        gateway passes each caller's own through); closing it closes the shared channel."""
        other = copy.copy(self)
        other._c = dataclasses.replace(self._c, token=token or self._c.token,
                                       request_id=request_id or self._c.request_id)  # fmt: skip
        return other

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """A unary RPC by name ("Generate", "GetJob", ...) → its proto response."""
        return await self._unary(method, request, timeout)

    def call_stream(self, method: str, request: Any,
                    timeout: float | None = None) -> AsyncIterator[Any]:  # fmt: skip
        """A server-streaming RPC by name → its proto messages (closing it cancels the call)."""
        return self._stream(method, request, timeout)

    async def _unary(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, timeout=self._c.deadline(timeout), metadata=self._c.metadata()
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def _stream(self, method: str, request: Any,
                      timeout: float | None = None) -> AsyncIterator[Any]:  # fmt: skip
        call = getattr(self._stub, method)(
            request, timeout=self._c.deadline(timeout), metadata=self._c.metadata()
        )
        try:
            async for item in call:
                yield item
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()

    async def run(self, request: pb.GenerateRequest, timeout: float | None = None) -> Generation:
        return generation_from_proto(await self._unary("Generate", request, timeout))

    async def run_stream(self, request: pb.GenerateRequest,
                         timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        async for e in self._stream("GenerateStream", request, timeout):
            yield event_from_proto(e)

    async def generate(self, prompt: str | bytes = "", *, modality: str = "text",
                       model: str = "", timeout: float | None = None, **knobs: Any) -> Generation:  # fmt: skip
        return await self.run(generate_request(prompt, modality=modality, model=model, **knobs),
                              timeout)  # fmt: skip

    def stream(self, prompt: str | bytes = "", *, modality: str = "text", model: str = "",
               timeout: float | None = None, **knobs: Any) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        return self.run_stream(
            generate_request(prompt, modality=modality, model=model, **knobs), timeout
        )

    async def infill(self, template: str | Iterable[str | int], *, modality: str = "text",
                     model: str = "", timeout: float | None = None, **knobs: Any) -> Generation:  # fmt: skip
        return await self.run(infill_request(template, modality=modality, model=model, **knobs),
                              timeout)  # fmt: skip

    async def midi(self, midi: bytes | str | Path | None = None, *, timeout: float | None = None,
                   **kwargs: Any) -> Generation:  # fmt: skip
        return await self.run(midi_request(midi, **kwargs), timeout)

    async def submit_batch(self, rows: Iterable[dict[str, Any]] | Iterable[pb.BatchItem], *,
                           idempotency_key: str = "", model: str = "") -> BatchJob:  # fmt: skip
        rows = list(rows)
        items = rows if rows and isinstance(rows[0], pb.BatchItem) else batch_items(rows)
        req = pb.SubmitBatchRequest(items=items, idempotency_key=idempotency_key, model=model)
        return batch_from_proto(await self._unary("SubmitBatch", req))

    async def get_batch(self, batch_id: str) -> BatchJob:
        return batch_from_proto(await self._unary("GetJob", pb.GetJobRequest(id=batch_id)))

    async def list_batches(self, page_size: int = 20,
                           page_token: str = "") -> tuple[list[BatchJob], str]:  # fmt: skip
        r = await self._unary("ListJobs",
                              pb.ListJobsRequest(page_size=page_size, page_token=page_token))  # fmt: skip
        return [batch_from_proto(j) for j in r.jobs], r.next_page_token

    async def cancel_batch(self, batch_id: str) -> BatchJob:
        return batch_from_proto(await self._unary("CancelJob", pb.CancelJobRequest(id=batch_id)))

    async def batch_results(self, batch_id: str, *, follow: bool = False,
                            offset: int = 0) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        req = pb.StreamJobResultsRequest(id=batch_id, follow=follow, offset=offset)
        async for r in self._stream("StreamJobResults", req, timeout=None if follow else 600):
            yield item_from_proto(r)

    async def wait_batch(self, batch_id: str, *, poll_s: float = 0.25,
                         timeout: float | None = None) -> BatchJob:  # fmt: skip
        import asyncio

        end = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get_batch(batch_id)
            if job.done:
                return job
            if end is not None and time.monotonic() > end:
                raise ServiceError(f"batch {batch_id} still {job.status} after {timeout}s",
                                   code="DEADLINE_EXCEEDED", field="id")  # fmt: skip
            await asyncio.sleep(poll_s)

    async def list_models(self) -> list[ModelCard]:
        r = await self._unary("ListModels", pb.ListModelsRequest())
        return [model_from_proto(m) for m in r.models]

    async def get_model(self, name: str = "") -> ModelCard:
        return model_from_proto(await self._unary("GetModel", pb.GetModelRequest(name=name)))

    async def health(self, service: str = "", timeout: float = 5.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
