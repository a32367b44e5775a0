"""Every error class carries its gRPC status code, and one function maps errors to statuses
(the servicer, the batch runner and the CLI use it), also for errors that crossed a process."""

from __future__ import annotations

import importlib

import grpc
import pytest

from unmask.engine.result import GenerationResult
from unmask.errors import NotReady, UnmaskError, error_dict, error_from_dict
from unmask.service.status import JobFailed, to_status

# What a user must see for the errors whose code matters most to a caller's retry logic.
EXPECTED = {
    "InvalidArgument": "INVALID_ARGUMENT",
    "MidiError": "INVALID_ARGUMENT",
    "NoNotesGenerated": "INTERNAL",
    "NotFound": "NOT_FOUND",
    "TooLarge": "RESOURCE_EXHAUSTED",
    "QueueFull": "RESOURCE_EXHAUSTED",
    "QueueFullError": "RESOURCE_EXHAUSTED",
    "NotReady": "UNAVAILABLE",
    "BrokerUnavailable": "UNAVAILABLE",
    "ResultMissing": "UNAVAILABLE",
    "ResultTimeout": "DEADLINE_EXCEEDED",
    "TimeLimitExceeded": "DEADLINE_EXCEEDED",
    "Cancelled": "CANCELLED",
    "DeadlineExceeded": "DEADLINE_EXCEEDED",
    "CheckpointError": "FAILED_PRECONDITION",
    "VocabMismatch": "FAILED_PRECONDITION",
}


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


# every module that defines errors (the training code's errors live in unmask.errors)
ERROR_MODULES = ("unmask.errors", "unmask.service.server", "unmask.service.batches",
                 "unmask.workers.protocol", "unmask.workers.tasks", "unmask.engine.engine",
                 "unmask.client")  # fmt: skip


def test_every_error_class_carries_a_valid_status_code_and_survives_the_wire():
    for name in ERROR_MODULES:
        importlib.import_module(name)
    classes = _all_subclasses(UnmaskError)
    names = {c.__name__ for c in classes}
    assert set(EXPECTED) <= names, set(EXPECTED) - names
    for cls in sorted(classes, key=lambda c: c.__name__):
        if cls.__name__ in ("JobFailed", "ServiceError"):  # built from a result / a status
            continue
        assert hasattr(grpc.StatusCode, cls.code), (cls, cls.code)
        if cls.__name__ in EXPECTED:
            assert cls.code == EXPECTED[cls.__name__], cls
        exc = cls("something went wrong", field="params.steps")
        code, message = to_status(exc)
        assert code == getattr(grpc.StatusCode, cls.code)
        assert message == "params.steps: something went wrong"
        # a job's error written by the Engine or a worker comes back with the same code
        wire = error_dict(exc)
        assert wire["type"] == cls.__name__ and wire["code"] == cls.code
        result = GenerationResult("job", "failed", error=wire)
        assert to_status(JobFailed(result)) == (code, message)


def test_foreign_exceptions_are_internal_without_leaking_their_text():
    code, message = to_status(KeyError("secret/path"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message
    assert error_dict(TimeoutError())["code"] == "DEADLINE_EXCEEDED"
    assert error_dict(ValueError())["message"] == "ValueError"


@pytest.mark.parametrize(("status", "code"), [("cancelled", "CANCELLED"),
                                              ("deadline_exceeded", "DEADLINE_EXCEEDED"),
                                              ("failed", "INTERNAL")])  # fmt: skip
def test_a_result_without_an_error_gets_its_status_code(status, code):
    assert GenerationResult("j", status).exception().code == code
    assert error_from_dict(None).code == "INTERNAL"


def test_the_model_still_loading_is_unavailable_not_internal():
    assert to_status(NotReady("the model is still loading"))[0] == grpc.StatusCode.UNAVAILABLE
