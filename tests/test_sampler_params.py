"""Validation of SamplerParams / ARParams: every bad value names its field and allowed range."""

from __future__ import annotations

import json

import pytest

from unmask.errors import InvalidArgument
from unmask.models.sampler_params import ARParams, SamplerParams

BAD_SAMPLER_VALUES = [
    ("gen_length", 0),
    ("gen_length", 10**9),
    ("gen_length", 3.5),
    ("gen_length", True),
    ("steps", 0),
    ("steps", 65),  # > gen_length 64
    ("block_length", -1),
    ("block_length", 65),
    ("threshold", 0.0),
    ("threshold", 1.5),
    ("threshold", float("nan")),
    ("position_score", "logit"),
    ("temperature", -0.1),
    ("temperature", float("inf")),
    ("temperature", "hot"),
    ("top_k", -1),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("remask_budget", -1),
    ("remask_budget", 65),
    ("remask_threshold", -0.1),
    ("remask_threshold", 1.1),
    ("use_cache", "full"),
    ("max_steps", 0),
    ("seed", -1),
    ("seed", 2**64),
    ("stop_at_eos", "yes"),
    ("grammar", 1),
]


@pytest.mark.parametrize(("field", "value"), BAD_SAMPLER_VALUES)
def test_invalid_sampler_param_names_its_field(field, value):
    with pytest.raises(InvalidArgument) as err:
        SamplerParams(**{"gen_length": 64, "steps": 16, field: value})
    assert err.value.field == field
    assert "must" in err.value.message


def test_steps_must_cover_every_block():
    with pytest.raises(InvalidArgument) as err:
        SamplerParams(gen_length=64, steps=3, block_length=16)
    assert err.value.field == "steps" and "[4, 64]" in err.value.message


def test_block_length_zero_means_the_full_canvas():
    p = SamplerParams(gen_length=64, steps=16, block_length=0)
    assert p.block_length is None and p.n_blocks == 1


def test_sampler_params_round_trip_through_json():
    p = SamplerParams(gen_length=32, steps=8, block_length=8, threshold=0.9, use_cache="dual")
    assert SamplerParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize(
    "params",
    [
        SamplerParams(),
        SamplerParams(gen_length=32, steps=8, block_length=8, threshold=0.9, use_cache="dual"),
        SamplerParams(gen_length=16, temperature=0.0, seed=0, unset=("steps", "top_p")),  # set
        # to the class defaults, yet set: they must stay out of `unset`
        SamplerParams(gen_length=16, steps=16, position_score="left_to_right", speculative=True),
        SamplerParams(gen_length=8, steps=8, block_length=0, stop_at_eos=False, grammar=False),
    ],
)
def test_the_wire_form_leaves_out_defaults_and_round_trips(params):
    """The queue's form of the parameters (`to_wire`) rebuilds the same parameters, and a
    request that uses no knob added later (here `speculative`) carries no key for it: a worker
    built before that knob existed still parses it."""
    wire = json.loads(json.dumps(params.to_wire()))
    assert SamplerParams.from_dict(wire) == params
    assert ("speculative" in wire) == params.speculative
    assert set(wire) <= set(params.to_dict())


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(InvalidArgument) as err:
        SamplerParams.from_dict({"gen_length": 8, "steps": 4, "temprature": 1.0})
    assert err.value.field == "temprature"


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_new_tokens", 0), ("temperature", -1.0), ("top_k", -2), ("top_p", 2.0),
     ("seed", -5), ("stop_at_eos", None), ("use_cache", "yes")],
)  # fmt: skip
def test_invalid_ar_param_names_its_field(field, value):
    with pytest.raises(InvalidArgument) as err:
        ARParams(**{field: value})
    assert err.value.field == field
