"""The `[MASK:n]` notation of infill templates, parsed in one place. Torch-free: the client,
the CLI, the request type and the Generator all use it."""

from __future__ import annotations

import re

from unmask.errors import InvalidArgument

MASK_MARKER = re.compile(r"\[MASK:([^\]]*)\]")


def parse_template(template: str, field: str = "template") -> tuple[str | int, ...]:
    """'a [MASK:5] b' → ('a ', 5, ' b'): strings are fixed text, ints are gap lengths in tokens.
    The one parser of the `[MASK:n]` notation (the client, the CLI and the request use it)."""
    parts: list[str | int] = []
    pos = 0
    for m in MASK_MARKER.finditer(template):
        if not m.group(1).isdigit() or int(m.group(1)) < 1:
            raise InvalidArgument(
                f"{m.group(0)} is not a gap: write [MASK:n] with a whole number n >= 1 "
                "(the gap's length in tokens)", field=field, value=m.group(0),
            )  # fmt: skip
        if m.start() > pos:
            parts.append(template[pos : m.start()])
        parts.append(int(m.group(1)))
        pos = m.end()
    if pos < len(template):
        parts.append(template[pos:])
    if not any(isinstance(p, int) for p in parts):
        raise InvalidArgument("the template has no [MASK:n] gap", field=field)
    return tuple(parts)
