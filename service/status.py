"""Errors → gRPC statuses, in one function. Torch-free.

Each error class carries its status code by name (`unmask.errors`); a job's error dict carries
the same code across processes. `to_status` is what the servicer, the batch store and the CLI
use; nothing else picks codes.
"""

from __future__ import annotations

import grpc

from unmask.engine.result import GenerationResult
from unmask.errors import UnmaskError


class JobFailed(UnmaskError):
    """A job that ended without output: its result's error, code included."""

    def __init__(self, result: GenerationResult) -> None:
        exc = result.exception()
        assert exc is not None, "a succeeded job did not fail"
        super().__init__(exc.message, field=exc.field, code=exc.code)
        self.result = result


def status_code(code: str) -> grpc.StatusCode:
    """A code name ("INVALID_ARGUMENT") → grpc.StatusCode; unknown names are INTERNAL."""
    return getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller gets for an exception (ours carry their code;
    anything else is a bug: INTERNAL)."""
    if isinstance(exc, UnmaskError):
        return status_code(exc.code), str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
