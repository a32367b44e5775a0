"""GenerationResult's JSON form (Redis results, stream events, batch items) round-trips, keeps
MIDI bytes exact and ignores the stored document's extra keys."""

from __future__ import annotations

import json

import pytest

from unmask.engine.result import GenerationResult
from unmask.errors import UnmaskError


def test_every_field_round_trips_through_json():
    r = GenerationResult("job", "succeeded", "text", bytes(range(256)), {"nfe": 3},
                         None, {"seed": 4, "gen_length": 8}, [[5, 9, 0.75]])  # fmt: skip
    wire = json.loads(json.dumps(r.to_wire()))
    assert GenerationResult.from_wire(wire) == r
    r.usage["nfe"] = 99  # the wire form shares nothing with the object
    assert wire["usage"]["nfe"] == 3


def test_a_stored_document_with_refs_and_unknown_status_reads_back_safely():
    doc = {"job_id": "j", "status": "weird", "output_text_ref": "k", "worker": "w@h",
           "output_midi": b"MThd", "error": {"code": "UNAVAILABLE", "message": "gone"}}  # fmt: skip
    r = GenerationResult.from_wire(doc)
    assert r.status == "failed" and r.output_midi == b"MThd"
    assert r.exception().code == "UNAVAILABLE"
    assert GenerationResult.from_wire({"status": "succeeded", "error": {"x": 1}}).error is None
    with pytest.raises(UnmaskError):
        GenerationResult.from_wire({"status": "succeeded", "output_midi_b64": "not base64!"})
