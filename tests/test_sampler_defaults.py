"""Sampler defaults are resolved in one place: unset fields take the model's per-modality defaults
(config.json `sampler_defaults`), set fields never change, and the CLI, the gRPC mapping and the
Python client give the same parameters for the same request."""

from __future__ import annotations

import argparse
import json

import pytest

from unmask.models.generation import Generator
from unmask.models.sampler_params import MODEL_DEFAULTABLE, SamplerParams
from unmask.service.cli import add_sampler_args, params_from_args
from unmask.service.mapping import sampler_params
from unmask.v1 import unmask_pb2 as pb

DEFAULTS = {"text": {"temperature": 0.7, "top_p": 0.9, "tokens_per_step": 2}}


@pytest.fixture(scope="module")
def generator(tiny_model_dir, tmp_path_factory):
    import shutil

    d = tmp_path_factory.mktemp("with-defaults") / "model"
    shutil.copytree(tiny_model_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["sampler_defaults"] = DEFAULTS
    (d / "config.json").write_text(json.dumps(config))
    return Generator.load(d)


def test_unset_fields_take_the_models_defaults_and_set_ones_stay(generator):
    p = SamplerParams(gen_length=32, temperature=0.0, unset=("steps", "top_p"))
    r = generator.resolve(p, "text")
    assert (r.temperature, r.top_p, r.steps, r.unset) == (0.0, 0.9, 16, ())
    # no defaults for code: SamplerParams' own, with steps clipped to the length
    r = generator.resolve(p, "code")
    assert (r.temperature, r.top_p, r.steps, r.unset) == (0.0, 1.0, 32, ())


def test_an_unset_steps_is_clipped_not_rejected():
    p = sampler_params(pb.SamplerParams(block_length=1, gen_length=16))
    assert p.steps == 16 and "steps" in p.unset


def test_cli_grpc_and_client_give_the_same_parameters(generator):
    parser = argparse.ArgumentParser()
    add_sampler_args(parser)
    cli = params_from_args(parser.parse_args(["--length", "32", "--top-p", "0.5"]))
    grpc = sampler_params(pb.SamplerParams(gen_length=32, top_p=0.5))
    from unmask.client import sampler_params as client_params

    via_client = sampler_params(client_params(gen_length=32, top_p=0.5))
    resolved = {generator.resolve(p, "text") for p in (cli, grpc, via_client)}
    assert len(resolved) == 1
    (r,) = resolved
    assert r.top_p == 0.5 and r.temperature == 0.7 and r.steps == 16


def test_unset_names_are_validated():
    with pytest.raises(Exception, match="unset"):
        SamplerParams(unset=("gen_length",))
    assert set(SamplerParams(unset=MODEL_DEFAULTABLE).unset) == set(MODEL_DEFAULTABLE)
