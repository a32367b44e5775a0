"""Proto messages ↔ the plain request/result/event dicts the dispatchers pass around.

Torch-free. Every validation error is an `InvalidArgument` whose field is the path in the proto
request (`params.top_p`, `infill.segments[2].text`, `midi_settings.tempo`), so a client can
point at what it sent.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unmask.engine.request import GenerationRequest, MidiSettings
from unmask.engine.result import GenerationResult
from unmask.errors import InvalidArgument, UnmaskError
from unmask.models.sampler_params import MODEL_DEFAULTABLE, SamplerParams
from unmask.service.status import JobFailed
from unmask.v1 import unmask_pb2 as pb

MODALITY_TO_PROTO = {"text": pb.MODALITY_TEXT, "code": pb.MODALITY_CODE, "midi": pb.MODALITY_MIDI}
MODALITY_FROM_PROTO = {v: k for k, v in MODALITY_TO_PROTO.items()}
_SAMPLER_FIELDS = {f.name for f in dataclasses.fields(SamplerParams)}
# proto SamplerParams field -> SamplerParams field (the rest share their names)
_PARAM_RENAMES = {"cache": "use_cache"}
_PARAM_PROTO_NAME = {v: k for k, v in _PARAM_RENAMES.items()}
# GenerationRequest field -> where the same value sits in the proto request
_REQUEST_FIELDS = {
    "template": "infill.segments",
    "segments": "infill.segments",
    "bars": "midi_infill.bars",
    "tracks": "midi_infill.tracks",
    "midi_b64": "midi",
}

BATCH_STATUS_TO_PROTO = {
    "running": pb.BATCH_STATUS_RUNNING,
    "cancelling": pb.BATCH_STATUS_CANCELLING,
    "completed": pb.BATCH_STATUS_COMPLETED,
    "cancelled": pb.BATCH_STATUS_CANCELLED,
}


def proto_field(field: str | None) -> str | None:
    """The proto path of a field named by the engine, the sampler or the request."""
    if not field:
        return field
    if field.startswith(("params.", "midi_settings", "infill.", "midi_infill.")):
        return field
    if field.startswith("segments["):
        return "infill." + field
    if field in _SAMPLER_FIELDS:
        return "params." + _PARAM_PROTO_NAME.get(field, field)
    return _REQUEST_FIELDS.get(field, field)


def relabel(exc: UnmaskError, prefix: str = "") -> UnmaskError:
    """The same error with its field as a proto path (`prefix` for batch items)."""
    exc.field = prefix + (proto_field(exc.field) or "request")
    return exc


# ---- requests ------------------------------------------------------------------------------


def sampler_params(msg: pb.SamplerParams) -> SamplerParams:
    """Set fields as given; unset ones are marked `unset` for the model's own defaults (resolved
    by the Generator), falling back to SamplerParams' (an unset `steps` clipped to gen_length)."""
    values: dict[str, Any] = {}
    for desc in msg.DESCRIPTOR.fields:
        if msg.HasField(desc.name):
            values[_PARAM_RENAMES.get(desc.name, desc.name)] = getattr(msg, desc.name)
    values["unset"] = tuple(n for n in MODEL_DEFAULTABLE if n not in values)
    try:
        return SamplerParams(**values)
    except InvalidArgument as exc:
        raise relabel(exc) from None


def _modality(msg: pb.GenerateRequest, source: str) -> str:
    inferred = "midi" if source in ("midi", "midi_infill", "midi_settings") else "text"
    if msg.modality == pb.MODALITY_UNSPECIFIED:
        return inferred
    if msg.modality not in MODALITY_FROM_PROTO:
        raise InvalidArgument("unknown modality", field="modality", value=msg.modality)
    modality = MODALITY_FROM_PROTO[msg.modality]
    if (inferred == "midi") != (modality == "midi"):
        raise InvalidArgument(
            f"{source} needs modality {'MIDI' if inferred == 'midi' else 'TEXT or CODE'}",
            field="modality",
        )
    return modality


def _segments(infill: pb.Infill) -> tuple[str | int, ...]:
    """Proto segments → the request's (text, or a gap length); their values (gap sizes, at
    least one gap) are checked once, by GenerationRequest."""
    parts: list[str | int] = []
    for i, seg in enumerate(infill.segments):
        kind = seg.WhichOneof("kind")
        if kind is None:
            raise InvalidArgument("set text or mask", field=f"infill.segments[{i}]")
        if kind == "text" and "[MASK:" in seg.text:  # a marker in fixed text is a client bug
            raise InvalidArgument("fixed text may not contain '[MASK:'; use a mask segment",
                                  field=f"infill.segments[{i}].text")  # fmt: skip
        parts.append(seg.mask if kind == "mask" else seg.text)
    return tuple(parts)


def generation_request(
    msg: pb.GenerateRequest, *, job_id: str | None = None, deadline: float | None = None,
    default_model: str = "default",
) -> GenerationRequest:  # fmt: skip
    """A proto request → a validated GenerationRequest (InvalidArgument names the proto field)."""
    source = msg.WhichOneof("input")
    if source is None:  # nothing to continue: a MIDI request starts a new piece, text a new text
        source = "midi_settings" if msg.modality == pb.MODALITY_MIDI else "prompt"
    modality = _modality(msg, source)
    params = sampler_params(msg.params)
    kwargs: dict[str, Any] = {
        "modality": modality,
        "params": params,
        "model": msg.model or default_model,
        "deadline": deadline,
    }
    if job_id:
        kwargs["job_id"] = job_id
    kwargs.update(stop=tuple(msg.stop), return_tokens=msg.return_tokens)
    if source == "prompt":
        kwargs["prompt"] = msg.prompt
    elif source == "chat":
        if not msg.chat.messages:
            raise InvalidArgument("needs at least one message", field="chat.messages")
        kwargs["chat"] = tuple((m.role, m.content) for m in msg.chat.messages)
    elif source == "midi":
        if not msg.midi:
            raise InvalidArgument("is empty: send a MIDI file, or use midi_settings", field="midi")
        kwargs["midi"] = msg.midi
    elif source == "infill":
        kwargs.update(kind="infill", segments=_segments(msg.infill))
    elif source == "midi_infill":
        mi = msg.midi_infill
        if not mi.midi:
            raise InvalidArgument("needs a MIDI file", field="midi_infill.midi")
        kwargs.update(
            kind="midi_infill", midi=mi.midi, bars=tuple(mi.bars),
            tracks=tuple(mi.tracks) if mi.tracks else None,
        )  # fmt: skip
    elif source == "midi_settings":
        s = msg.midi_settings
        kwargs["midi_settings"] = MidiSettings(
            time_signature=s.time_signature or "4/4",
            tempo=s.tempo or 120.0,
            programs=tuple(s.programs),
            voices=s.voices or (len(s.programs) or 1),
            bars=s.bars or 4,
        )
    try:
        return GenerationRequest(**kwargs)
    except InvalidArgument as exc:
        if source == "midi_infill" and exc.field == "midi":
            exc.field = "midi_infill.midi"
        raise relabel(exc) from None


# ---- results and events ------------------------------------------------------------------


MAX_SAMPLES = 16
FINISH_REASONS = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS,
                  "stop": pb.FINISH_REASON_STOP, "max_steps": pb.FINISH_REASON_MAX_STEPS}  # fmt: skip


def sample_count(msg: pb.GenerateRequest, *, allowed: bool) -> int:
    """`n` of a request (0 = 1); only `Generate` runs several samples of one request."""
    n = msg.n or 1
    if n > 1 and not allowed:
        raise InvalidArgument("n > 1 is for Generate; send one request per sample", field="n")
    if n > MAX_SAMPLES:
        raise InvalidArgument(f"must be in [1, {MAX_SAMPLES}], got {n}", field="n", value=n)
    return n


def params_to_proto(params: dict[str, Any]) -> pb.SamplerParams:
    """The parameters a job ran with (SamplerParams.to_dict) → proto; None stays unset."""
    out = pb.SamplerParams()
    for name, value in params.items():
        name = _PARAM_PROTO_NAME.get(name, name)
        if value is not None and name in out.DESCRIPTOR.fields_by_name:
            setattr(out, name, value)
    return out


def usage_to_proto(u: dict[str, Any] | None) -> pb.Usage:
    u = u or {}
    return pb.Usage(
        reason=FINISH_REASONS.get(
            str(u.get("finish_reason") or ""), pb.FINISH_REASON_UNSPECIFIED
        ),  # fmt: skip
        prompt_tokens=int(u.get("prompt_tokens") or 0),
        generated_tokens=int(u.get("generated_tokens") or 0),
        nfe=int(u.get("nfe") or 0),
        steps=int(u.get("steps") or 0),
        tokens_per_forward=float(u.get("tokens_per_forward") or 0.0),
        latency_s=float(u.get("latency_s") or 0.0),
        finish_reason=str(u.get("finish_reason") or ""),
    )


def job_failed(result: GenerationResult) -> JobFailed:
    """A failed job's result → the error its caller gets, its field as a proto path."""
    failed = JobFailed(result)
    failed.field = proto_field(failed.field)
    return failed


def response_to_proto(result: GenerationResult, modality: str) -> pb.GenerateResponse:
    """A succeeded job's result → GenerateResponse."""
    return pb.GenerateResponse(
        job_id=result.job_id,
        modality=MODALITY_TO_PROTO.get(modality, pb.MODALITY_UNSPECIFIED),
        text=result.output_text,
        midi=result.output_midi,
        usage=usage_to_proto(result.usage),
        params=params_to_proto(result.params),
        tokens=_tokens(result.tokens),
    )


def _tokens(triples: list[list[Any]] | None) -> list[pb.Token]:
    return [pb.Token(position=int(p), id=int(i), confidence=float(c)) for p, i, c in triples or []]


def event_to_proto(event: dict[str, Any]) -> pb.GenerateEvent | None:
    """A progress event (accepted / step / block) → GenerateEvent; None for unknown types."""
    kind = event.get("type")
    if kind == "accepted":
        return pb.GenerateEvent(accepted=pb.GenerateEvent.Accepted(job_id=event.get("job_id", "")))
    if kind == "step":
        return pb.GenerateEvent(
            step=pb.GenerateEvent.Step(
                step=int(event.get("step") or 0),
                block=int(event.get("block") or 0),
                committed=_tokens(event.get("committed")),
                tentative=_tokens(event.get("tentative")),
                remasked=[int(p) for p in event.get("remasked") or []],
            )
        )
    if kind == "block":
        return pb.GenerateEvent(
            block=pb.GenerateEvent.Block(
                index=int(event.get("index") or 0),
                text=str(event.get("text") or ""),
                ids=[int(i) for i in event.get("ids") or []],
            )
        )
    return None


# ---- batches -------------------------------------------------------------------------------


def batch_to_proto(rec: dict[str, Any], note: str = "") -> pb.BatchJob:
    counts = rec.get("counts") or {}
    total = int(counts.get("total") or 0)
    done = sum(int(counts.get(k) or 0) for k in ("succeeded", "failed", "cancelled"))
    return pb.BatchJob(
        id=rec["id"],
        status=BATCH_STATUS_TO_PROTO.get(rec.get("status", ""), pb.BATCH_STATUS_UNSPECIFIED),
        counts=pb.BatchCounts(
            total=total,
            succeeded=int(counts.get("succeeded") or 0),
            failed=int(counts.get("failed") or 0),
            cancelled=int(counts.get("cancelled") or 0),
            pending=max(0, total - done),
        ),
        model=rec.get("model", ""),
        idempotency_key=rec.get("idempotency_key", ""),
        created_at=float(rec.get("created_at") or 0.0),
        finished_at=float(rec.get("finished_at") or 0.0),
        note=note,
    )


def item_result_to_proto(item: dict[str, Any]) -> pb.BatchItemResult:
    """A stored item result ({custom_id, modality, **GenerationResult.to_wire()}) →
    BatchItemResult; an error's field is a proto path, as `Generate` reports it."""
    result = GenerationResult.from_wire(item)
    out = pb.BatchItemResult(custom_id=item["custom_id"], status=result.status)
    if result.ok:
        out.response.CopyFrom(response_to_proto(result, item.get("modality", "")))
    else:
        exc = result.exception()
        assert exc is not None
        err = result.error or {}
        out.error.CopyFrom(
            pb.ItemError(
                code=exc.code,
                type=str(err.get("type") or ""),
                field=proto_field(exc.field) or "",
                message=exc.message,
            )
        )
    return out
