"""Which gRPC status code a failure gets, in one table.

Errors arrive two ways: as exceptions raised in the front end (validation, a full queue, Redis
down) and as the `error` dict of a finished job ({"type", "field", "message"}, written by the
Engine or a worker). Both map through the error's type name, so a worker's error and the same
error raised locally give the same code. Torch-free.
"""

from __future__ import annotations

from typing import Any

import grpc

from unmask.errors import UnmaskError

C = grpc.StatusCode


class NotFound(UnmaskError):
    """An unknown model, batch job or job id."""


class TooLarge(UnmaskError):
    """A request over a size limit (batch items, message bytes)."""


class JobFailed(UnmaskError):
    """A job that ended without output: its status and the Engine's / worker's error dict."""

    def __init__(self, status: str, error: dict[str, Any] | None) -> None:
        error = error or {}
        super().__init__(str(error.get("message") or status), field=error.get("field"))
        self.status = status
        self.error = error


CODE_BY_TYPE: dict[str, grpc.StatusCode] = {
    "InvalidArgument": C.INVALID_ARGUMENT,
    "TokenizerError": C.INVALID_ARGUMENT,
    "MidiError": C.INVALID_ARGUMENT,  # a corrupt or note-less input file
    "VocabMismatch": C.FAILED_PRECONDITION,
    "CheckpointError": C.FAILED_PRECONDITION,
    "NotFound": C.NOT_FOUND,
    "TooLarge": C.RESOURCE_EXHAUSTED,
    "QueueFull": C.RESOURCE_EXHAUSTED,  # the Engine's queue (local)
    "QueueFullError": C.RESOURCE_EXHAUSTED,  # a model's Celery queue
    "BrokerUnavailable": C.UNAVAILABLE,
    "ResultMissing": C.UNAVAILABLE,
    "ResultTimeout": C.DEADLINE_EXCEEDED,
    "TimeLimitExceeded": C.DEADLINE_EXCEEDED,
    "SoftTimeLimitExceeded": C.DEADLINE_EXCEEDED,
    "DeadlineExceeded": C.DEADLINE_EXCEEDED,
    "Cancelled": C.CANCELLED,
    "Shutdown": C.UNAVAILABLE,
}

# terminal job status -> code (succeeded is OK; failed goes through the error's type)
CODE_BY_STATUS = {"cancelled": C.CANCELLED, "deadline_exceeded": C.DEADLINE_EXCEEDED}


def code_for_error(error: dict[str, Any] | None, status: str = "failed") -> grpc.StatusCode:
    if status in CODE_BY_STATUS:
        return CODE_BY_STATUS[status]
    error = error or {}
    kind = str(error.get("type") or "")
    if kind == "MidiError" and error.get("field") == "output":
        return C.INTERNAL  # the model wrote no playable notes: not the caller's input at fault
    return CODE_BY_TYPE.get(kind, C.INTERNAL)


def code_for_exception(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, JobFailed):
        return code_for_error(exc.error, exc.status)
    for cls in type(exc).__mro__:
        if cls.__name__ in CODE_BY_TYPE:
            return CODE_BY_TYPE[cls.__name__]
    return C.INTERNAL


def error_message(error: dict[str, Any] | None) -> str:
    error = error or {}
    message = str(error.get("message") or error.get("type") or "the job failed")
    field = error.get("field")
    return f"{field}: {message}" if field else message


def error_dict(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, UnmaskError):
        return {"type": type(exc).__name__, "field": exc.field, "message": exc.message}
    return {"type": type(exc).__name__, "field": None, "message": str(exc)}
