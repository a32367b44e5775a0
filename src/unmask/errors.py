"""One exception hierarchy for everything a user can get wrong.

Every error carries the field (or input) at fault and the offending value, so the CLI and the
gRPC layer can turn it into a message a user understands without a traceback.
"""

from __future__ import annotations

from typing import Any


class UnmaskError(Exception):
    """Base class of every error unmask raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(UnmaskError):
    """A request parameter is out of its allowed range or of the wrong kind."""


class TokenizerError(UnmaskError):
    """Input a tokenizer cannot encode or ids it cannot decode."""


class MidiError(TokenizerError):
    """MIDI bytes that are empty, corrupt, truncated or hold no notes."""


class VocabMismatch(UnmaskError):
    """A model and a tokenizer that were not trained together."""


class CorpusError(UnmaskError):
    """A corpus source or build step that cannot proceed."""


class CheckpointError(UnmaskError):
    """A model directory that is missing files or is inconsistent."""
