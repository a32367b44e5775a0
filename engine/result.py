"""The one result type every layer passes around: Engine, worker, dispatchers, batch store,
gRPC mapping, CLI. Torch-free.

Inside a process `output_midi` stays bytes; `to_wire` / `from_wire` are the JSON form for Redis
(results, stream events, batch items), where MIDI travels base64-encoded. A failed, cancelled or
expired job carries `error` in `unmask.errors.error_dict`'s layout, code included.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field, fields
from typing import Any

from unmask.errors import UnmaskError, error_from_dict

SUCCEEDED, FAILED, CANCELLED, DEADLINE = "succeeded", "failed", "cancelled", "deadline_exceeded"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED, DEADLINE)
# the code a job that ended this way gets when its error names none
_STATUS_CODE = {FAILED: "INTERNAL", CANCELLED: "CANCELLED", DEADLINE: "DEADLINE_EXCEEDED"}


@dataclass
class GenerationResult:
    job_id: str
    status: str  # one of TERMINAL
    output_text: str = ""
    output_midi: bytes = b""
    usage: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # {"type", "code", "field", "message"} unless succeeded
    params: dict[str, Any] = field(default_factory=dict)  # the sampler parameters it ran with
    tokens: list[list[Any]] = field(default_factory=list)  # [position, id, confidence] if asked

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED

    def exception(self) -> UnmaskError | None:
        """The job's error as an exception carrying its status code; None if it succeeded."""
        if self.ok:
            return None
        return error_from_dict(self.error or {"message": f"the job {self.status}"},
                               default_code=_STATUS_CODE.get(self.status, "INTERNAL"))  # fmt: skip

    def to_wire(self) -> dict[str, Any]:
        """JSON-safe: every field by name, MIDI as `output_midi_b64` (a new field needs no code
        here, only a JSON-friendly value)."""
        wire = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "output_midi"}
        wire["output_midi_b64"] = base64.b64encode(self.output_midi).decode()
        return json.loads(json.dumps(wire))  # a deep copy: the wire form shares nothing

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> GenerationResult:
        """The JSON form back; `output_midi` may already be bytes (a payload fetched by
        reference). Keys it does not know (a stored document's refs, `worker`, ...) are
        ignored; missing ones take their defaults."""
        midi = d.get("output_midi")
        if not isinstance(midi, bytes):
            try:
                midi = base64.b64decode(d.get("output_midi_b64") or "", validate=True)
            except (binascii.Error, ValueError) as exc:
                raise UnmaskError("a stored result's MIDI is not base64",
                                  field="output_midi_b64") from exc  # fmt: skip
        known = {f.name for f in fields(cls)} - {"output_midi"}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        status = str(values.pop("status", FAILED))
        if status not in TERMINAL:
            status = FAILED
        if status == SUCCEEDED:
            values.pop("error", None)
        return cls(**{"job_id": "", **values}, status=status, output_midi=midi)
