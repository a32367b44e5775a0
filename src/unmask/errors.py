"""One exception hierarchy for everything a user can get wrong, and the status each one gets.

Every error carries the field (or input) at fault and the offending value, so the CLI and the
gRPC layer can turn it into a message a user understands without a traceback, and its class
carries the gRPC status code (by name: this module imports neither grpc nor torch). A job's
error travels between processes as `error_dict(exc)` ({"type", "code", "field", "message"});
`error_from_dict` turns it back into an exception with the same code.
"""

from __future__ import annotations

from typing import Any, ClassVar


class UnmaskError(Exception):
    """Base class of every error unmask raises on purpose."""

    code: ClassVar[str] = "INTERNAL"  # the gRPC status code's name

    def __init__(
        self, message: str, *, field: str | None = None, value: Any = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value
        if code is not None:  # an error rebuilt from another process keeps its code
            self.code = code  # type: ignore[misc]

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(UnmaskError):
    """A request parameter is out of its allowed range or of the wrong kind."""

    code = "INVALID_ARGUMENT"


class TokenizerError(UnmaskError):
    """Input a tokenizer cannot encode or ids it cannot decode."""

    code = "INVALID_ARGUMENT"


class MidiError(TokenizerError):
    """MIDI bytes that are empty, corrupt, truncated or hold no notes."""


class NoNotesGenerated(MidiError):
    """The model's MIDI tokens hold no playable notes: not the caller's input at fault."""

    code = "INTERNAL"


class VocabMismatch(UnmaskError):
    """A model and a tokenizer that were not trained together."""

    code = "FAILED_PRECONDITION"


class CorpusError(UnmaskError):
    """A corpus source or build step that cannot proceed."""

    code = "FAILED_PRECONDITION"


class CheckpointError(UnmaskError):
    """A model directory that is missing files or is inconsistent."""

    code = "FAILED_PRECONDITION"


class NotFound(UnmaskError):
    """An unknown model, batch job or job id."""

    code = "NOT_FOUND"


class TooLarge(UnmaskError):
    """A request over a size limit (batch items, message bytes)."""

    code = "RESOURCE_EXHAUSTED"


class QueueFull(UnmaskError):
    """A queue (the Engine's, or a model's in Redis) is full: back-pressure, try again later."""

    code = "RESOURCE_EXHAUSTED"


class NotReady(UnmaskError):
    """The model is still loading or failed to load, or the Engine is shutting down."""

    code = "UNAVAILABLE"


class Unavailable(UnmaskError):
    """A service the request needs (the job queue's Redis, a stored payload) cannot be
    reached or has gone: worth retrying."""

    code = "UNAVAILABLE"


class Cancelled(UnmaskError):
    """The job was cancelled (by its caller, or with its batch)."""

    code = "CANCELLED"


class DeadlineExceeded(UnmaskError):
    """The job ran past its deadline or a time limit."""

    code = "DEADLINE_EXCEEDED"


def error_dict(exc: BaseException) -> dict[str, Any]:
    """Any exception → the layout a job's error travels in. Exceptions that are not ours are
    bugs (INTERNAL), except a plain TimeoutError."""
    if isinstance(exc, UnmaskError):
        return {"type": type(exc).__name__, "code": exc.code, "field": exc.field,
                "message": exc.message}  # fmt: skip
    code = "DEADLINE_EXCEEDED" if isinstance(exc, TimeoutError) else "INTERNAL"
    return {"type": type(exc).__name__, "code": code, "field": None,
            "message": str(exc) or type(exc).__name__}  # fmt: skip


def error_from_dict(error: dict[str, Any] | None, default_code: str = "INTERNAL") -> UnmaskError:
    """A job's error dict → an exception with the same message, field and code."""
    error = error or {}
    return UnmaskError(
        str(error.get("message") or error.get("type") or "the job failed"),
        field=error.get("field") or None,
        code=str(error.get("code") or default_code),
    )
