"""The one request type every layer passes around: CLI, gRPC mapping, Celery message, Engine.

Plain and JSON-serialisable (MIDI bytes travel base64-encoded), validated on construction with
errors that name the field, and free of torch so the front end can import it.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from unmask.errors import InvalidArgument
from unmask.models.sampler_params import SamplerParams
from unmask.models.template import parse_template

KINDS = ("generate", "infill", "midi_infill")
MODALITIES = ("text", "code", "midi")
MAX_PROMPT_CHARS = 200_000
MAX_MIDI_BYTES = 4 << 20
MAX_STOP, MAX_STOP_CHARS = 8, 200
MAX_GAP_TOKENS = 65_536
# Sanity caps on MidiSettings. The real limit is the model's window, checked by the Generator at
# prepare time (models/generation.py `midi_settings_limits`): every bar of every voice needs its
# structure and at least one note, so voices * (5 + 5 * bars) + 2 <= max_seq_len; in the shipped
# 384-token model: 75 bars with 1 voice, 37 with 2, 18 with 4, 3 with 16.
MAX_VOICES = 16
MAX_BARS = 64
# Voices without explicit programs get distinct General MIDI programs, as in the corpus's
# chorales (violin, viola, cello, contrabass, then winds).
DEFAULT_VOICE_PROGRAMS = (40, 41, 42, 43, 71, 70, 68, 73, 0, 24, 32, 56, 57, 60, 65, 66)
_TIME_SIGNATURE = re.compile(r"^[1-9][0-9]?/(1|2|4|8|16|32)$")


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class MidiSettings:
    """A new MIDI piece from settings: each voice is a track with its own program; every bar of
    every track starts with the time signature (the first with the tempo), the notes are
    generated. Whether the vocabulary has the time signature is checked by the Generator; the
    tempo snaps to the nearest tempo token."""

    time_signature: str = "4/4"
    tempo: float = 120.0  # beats per minute
    programs: tuple[int, ...] = ()  # General MIDI program per voice; () = defaults for `voices`
    voices: int = 1  # used when `programs` is empty
    bars: int = 4

    def __post_init__(self) -> None:
        f = "midi_settings."
        if not isinstance(self.time_signature, str) or not _TIME_SIGNATURE.match(
            self.time_signature
        ):
            raise InvalidArgument(
                "must look like 4/4 (numerator/power-of-two denominator)",
                field=f + "time_signature", value=self.time_signature,
            )  # fmt: skip
        tempo = self.tempo
        if isinstance(tempo, bool) or not isinstance(tempo, int | float) or not 1 <= tempo <= 1000:
            raise InvalidArgument("must be in [1, 1000] bpm", field=f + "tempo", value=tempo)
        programs = tuple(self.programs)
        object.__setattr__(self, "programs", programs)
        if len(programs) > MAX_VOICES:
            raise InvalidArgument(f"at most {MAX_VOICES} voices", field=f + "programs")
        for p in programs:
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 127:
                raise InvalidArgument("programs must be in [0, 127]", field=f + "programs", value=p)
        for name, hi in (("voices", MAX_VOICES), ("bars", MAX_BARS)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise InvalidArgument(f"must be in [1, {hi}]", field=f + name, value=v)
        if programs and self.voices not in (1, len(programs)):
            raise InvalidArgument(
                f"{len(programs)} programs but {self.voices} voices", field=f + "voices"
            )

    @property
    def voice_programs(self) -> tuple[int, ...]:
        return self.programs or DEFAULT_VOICE_PROGRAMS[: self.voices]

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_signature": self.time_signature,
            "tempo": self.tempo,
            "programs": list(self.programs),
            "voices": self.voices,
            "bars": self.bars,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MidiSettings:
        if not isinstance(d, dict):
            raise InvalidArgument("must be an object", field="midi_settings")
        known = {"time_signature", "tempo", "programs", "voices", "bars"}
        for key in d:
            if key not in known:
                raise InvalidArgument("unknown setting", field=f"midi_settings.{key}")
        return cls(**{**d, "programs": tuple(d.get("programs") or ())})


@dataclass(frozen=True)
class GenerationRequest:
    """kind "generate": continue `prompt` (text/code) or `midi` (MIDI; empty = from scratch).
    kind "infill":   fill the gaps of `segments` (text/code): strings are kept byte-identical,
                     ints are gaps of that many tokens; `template` ('a [MASK:5] b') is parsed
                     into segments once, here.
    kind "midi_infill": rewrite `bars` of `tracks` (None = all) of the MIDI file `midi`.
    `midi_settings` (kind "generate", modality "midi", no `midi`): a new piece from settings."""

    modality: str
    kind: str = "generate"
    prompt: str = ""
    template: str = ""  # convenience for callers holding a string: becomes `segments`
    segments: tuple[str | int, ...] = ()
    midi: bytes = b""
    bars: tuple[int, ...] = ()
    tracks: tuple[int, ...] | None = None
    params: SamplerParams = field(default_factory=SamplerParams)
    job_id: str = field(default_factory=new_job_id)
    model: str = "default"
    deadline: float | None = None  # absolute time.time(); None = no deadline
    midi_settings: MidiSettings | None = None
    stop: tuple[str, ...] = ()  # text/code: the output ends before the first of these
    return_tokens: bool = False  # the result carries each generated token and its confidence
    chat: tuple[tuple[str, str], ...] = ()  # (role, content) messages: the model's chat template
    # step and block events while it runs; False (a unary call, a batch item: nobody watches)
    # sends only `accepted` and the final result, sparing each step an event per job
    progress: bool = True

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
            segments = tuple(self.segments) or (
                parse_template(self.template) if self.template else ()
            )
            object.__setattr__(self, "segments", segments)
            object.__setattr__(self, "template", "")
            _check_segments(segments)
        elif self.segments or self.template:
            raise InvalidArgument("segments are for kind infill", field="segments")
        if self.kind == "midi_infill":
            if self.modality != "midi":
                raise InvalidArgument("midi_infill needs modality midi", field="modality")
            if not self.midi:
                raise InvalidArgument("midi_infill needs a MIDI file", field="midi")
            if not self.bars or any(not isinstance(b, int) or b < 0 for b in self.bars):
                raise InvalidArgument("needs one or more bar numbers >= 0", field="bars")
        if self.kind == "generate" and self.modality != "midi" and self.midi:
            raise InvalidArgument("a MIDI prompt needs modality midi", field="midi")
        stop = tuple(self.stop) if isinstance(self.stop, list | tuple) else self.stop
        object.__setattr__(self, "stop", stop)
        if not isinstance(stop, tuple) or len(stop) > MAX_STOP:
            raise InvalidArgument(f"at most {MAX_STOP} stop strings", field="stop")
        for i, text in enumerate(stop):
            if not isinstance(text, str) or not 1 <= len(text) <= MAX_STOP_CHARS:
                raise InvalidArgument(f"a stop string has 1..{MAX_STOP_CHARS} characters",
                                      field=f"stop[{i}]", value=text)  # fmt: skip
        if stop and self.modality == "midi":
            raise InvalidArgument("stop strings are for text and code", field="stop")
        for name in ("return_tokens", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument("must be true or false", field=name)
        if self.chat:
            _check_chat(self)
        if self.midi_settings is not None:
            if not isinstance(self.midi_settings, MidiSettings):
                raise InvalidArgument("must be MidiSettings", field="midi_settings")
            if self.kind != "generate" or self.modality != "midi" or self.midi:
                raise InvalidArgument(
                    "settings start a new piece: kind generate, modality midi, no MIDI file",
                    field="midi_settings",
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "model": self.model,
            "kind": self.kind,
            "modality": self.modality,
            "prompt": self.prompt,
            "segments": list(self.segments),
            "midi_b64": base64.b64encode(self.midi).decode() if self.midi else "",
            "bars": list(self.bars),
            "tracks": list(self.tracks) if self.tracks is not None else None,
            "params": self.params.to_wire(),
            "deadline": self.deadline,
            "midi_settings": self.midi_settings.to_dict() if self.midi_settings else None,
            "stop": list(self.stop),
            "return_tokens": self.return_tokens,
            "chat": [list(m) for m in self.chat],
            "progress": self.progress,
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
        settings = d.get("midi_settings")
        kwargs = {k: d[k] for k in ("job_id", "model", "kind", "modality", "prompt", "template",
                                    "deadline") if d.get(k) is not None}  # fmt: skip
        segments = d.get("segments") or ()
        if not isinstance(segments, list | tuple):
            raise InvalidArgument("must be a list", field="segments")
        return cls(
            **kwargs,
            midi=midi,
            segments=tuple(segments),
            bars=tuple(d.get("bars") or ()),
            tracks=tuple(tracks) if tracks is not None else None,
            params=SamplerParams.from_dict(params),
            midi_settings=MidiSettings.from_dict(settings) if settings is not None else None,
            stop=tuple(d.get("stop") or ()),
            return_tokens=bool(d.get("return_tokens", False)),
            chat=tuple(tuple(m) for m in d.get("chat") or ()),
            progress=bool(d.get("progress", True)),
        )


def _check_chat(request: GenerationRequest) -> None:
    """Messages are (role, content) string pairs, for a text/code generation with no prompt."""
    chat = tuple(tuple(m) for m in request.chat)
    object.__setattr__(request, "chat", chat)
    if request.kind != "generate" or request.modality == "midi" or request.prompt:
        raise InvalidArgument("chat is a text/code generation without a prompt", field="chat")
    for i, m in enumerate(chat):
        if len(m) != 2 or not all(isinstance(x, str) for x in m) or not 1 <= len(m[0]) <= 32:
            raise InvalidArgument("a message is a role (1..32 characters) and its content",
                                  field=f"chat.messages[{i}]")  # fmt: skip
    if sum(len(m[1]) for m in chat) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"at most {MAX_PROMPT_CHARS} characters", field="chat")


def _check_segments(segments: tuple[Any, ...]) -> None:
    gaps = 0
    for i, part in enumerate(segments):
        if isinstance(part, bool) or not isinstance(part, int | str):
            raise InvalidArgument("a segment is fixed text or a gap length",
                                  field=f"segments[{i}]", value=part)  # fmt: skip
        if isinstance(part, int):
            if not 1 <= part <= MAX_GAP_TOKENS:
                raise InvalidArgument(f"a gap needs 1..{MAX_GAP_TOKENS} tokens",
                                      field=f"segments[{i}].mask", value=part)  # fmt: skip
            gaps += 1
    if not gaps:
        raise InvalidArgument("needs at least one gap", field="segments")
    if sum(len(p) for p in segments if isinstance(p, str)) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"fixed text of at most {MAX_PROMPT_CHARS} characters",
                              field="segments")  # fmt: skip
