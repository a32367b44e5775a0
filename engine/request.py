"""The one request type every layer passes around: CLI, gRPC mapping, Celery message, Engine.

Plain and JSON-serialisable (MIDI bytes travel base64-encoded), validated on construction with
errors that name the field, and free of torch so the front end can import it.
"""

from __future__ import annotations

import base64
import binascii
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from unmask.errors import InvalidArgument
from unmask.models.sampler_params import SamplerParams

KINDS = ("generate", "infill", "midi_infill")
MODALITIES = ("text", "code", "midi")
MAX_PROMPT_CHARS = 200_000
MAX_MIDI_BYTES = 4 << 20


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class GenerationRequest:
    """kind "generate": continue `prompt` (text/code) or `midi` (MIDI; empty = from scratch).
    kind "infill":   fill the [MASK:n] gaps of `template` (text/code).
    kind "midi_infill": rewrite `bars` of `tracks` (None = all) of the MIDI file `midi`."""

    modality: str
    kind: str = "generate"
    prompt: str = ""
    template: str = ""
    midi: bytes = b""
    bars: tuple[int, ...] = ()
    tracks: tuple[int, ...] | None = None
    params: SamplerParams = field(default_factory=SamplerParams)
    job_id: str = field(default_factory=new_job_id)
    model: str = "default"
    deadline: float | None = None  # absolute time.time(); None = no deadline

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(
                f"must be one of {', '.join(KINDS)}", field="kind", value=self.kind
            )
        if self.modality not in MODALITIES:
            raise InvalidArgument(
                f"must be one of {', '.join(MODALITIES)}", field="modality", value=self.modality
            )
        for name, limit in (("prompt", MAX_PROMPT_CHARS), ("template", MAX_PROMPT_CHARS)):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidArgument("must be a string", field=name)
            if len(value) > limit:
                raise InvalidArgument(f"must be at most {limit} characters", field=name)
        if not isinstance(self.midi, bytes) or len(self.midi) > MAX_MIDI_BYTES:
            raise InvalidArgument(f"must be at most {MAX_MIDI_BYTES} bytes", field="midi")
        if not isinstance(self.params, SamplerParams):
            raise InvalidArgument("must be SamplerParams", field="params")
        if not self.job_id or not isinstance(self.job_id, str) or len(self.job_id) > 128:
            raise InvalidArgument("must be a non-empty string of <= 128 chars", field="job_id")
        if self.deadline is not None and not (
            isinstance(self.deadline, int | float) and math.isfinite(self.deadline)
        ):
            raise InvalidArgument("must be a finite timestamp", field="deadline")
        if self.kind == "infill":
            if self.modality == "midi":
                raise InvalidArgument("MIDI gaps use kind midi_infill", field="kind")
            if "[MASK:" not in self.template:
                raise InvalidArgument("needs at least one [MASK:n] gap", field="template")
        if self.kind == "midi_infill":
            if self.modality != "midi":
                raise InvalidArgument("midi_infill needs modality midi", field="modality")
            if not self.midi:
                raise InvalidArgument("midi_infill needs a MIDI file", field="midi")
            if not self.bars or any(not isinstance(b, int) or b < 0 for b in self.bars):
                raise InvalidArgument("needs one or more bar numbers >= 0", field="bars")
        if self.kind == "generate" and self.modality != "midi" and self.midi:
            raise InvalidArgument("a MIDI prompt needs modality midi", field="midi")

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "model": self.model,
            "kind": self.kind,
            "modality": self.modality,
            "prompt": self.prompt,
            "template": self.template,
            "midi_b64": base64.b64encode(self.midi).decode() if self.midi else "",
            "bars": list(self.bars),
            "tracks": list(self.tracks) if self.tracks is not None else None,
            "params": self.params.to_dict(),
            "deadline": self.deadline,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationRequest:
        if not isinstance(d, dict):
            raise InvalidArgument("a request must be a JSON object", field="request")
        try:
            midi = base64.b64decode(d.get("midi_b64") or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidArgument("is not valid base64", field="midi_b64") from exc
        params = d.get("params") or {}
        if not isinstance(params, dict):
            raise InvalidArgument("must be an object", field="params")
        tracks = d.get("tracks")
        kwargs = {k: d[k] for k in ("job_id", "model", "kind", "modality", "prompt", "template",
                                    "deadline") if d.get(k) is not None}  # fmt: skip
        return cls(
            **kwargs,
            midi=midi,
            bars=tuple(d.get("bars") or ()),
            tracks=tuple(tracks) if tracks is not None else None,
            params=SamplerParams.from_dict(params),
        )
