"""Public checkpoints that cannot work are refused with a typed error a user understands, and our
vocabulary's features (MIDI, settings) are refused for them with INVALID_ARGUMENT naming the
field."""

from __future__ import annotations

import json
import shutil

import pytest
from public_fixtures import write_checkpoint
from safetensors.torch import load_file, save_file

from unmask.engine.request import GenerationRequest, MidiSettings
from unmask.errors import CheckpointError, InvalidArgument
from unmask.models.families.generator import PublicGenerator
from unmask.models.generation import Generator
from unmask.models.hf_checkpoint import load_hf
from unmask.models.sampler_params import SamplerParams


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("sdar"), "sdar")


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("llada"), "llada")


def _copy(src, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture_is_refused(sdar, tmp_path):
    d = _copy(sdar, tmp_path)
    _edit_config(d, architectures=["MysteryForCausalLM"], model_type="mystery")
    with pytest.raises(CheckpointError) as err:
        load_hf(d, dtype="float32")
    assert err.value.field == "architectures"
    assert "MysteryForCausalLM" in str(err.value) and "SDARForCausalLM" in str(err.value)


def test_pad_equal_to_mask_is_refused(llada, tmp_path):
    d = _copy(llada, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    _edit_config(d, pad_token_id=cfg["mask_token_id"])
    with pytest.raises(CheckpointError) as err:
        load_hf(d, dtype="float32")
    assert err.value.field == "pad_token_id" and "MASK" in err.value.message


def test_pad_equal_to_eos_gets_a_distinct_filler(llada):
    _, tok, meta = load_hf(llada, dtype="float32")  # LLaDA declares pad == eos
    assert meta["pad_id"] not in (meta["eos_id"], meta["mask_id"])


@pytest.mark.parametrize("size", [0, -4])
def test_wrong_block_size_in_config_is_refused(sdar, tmp_path, size):
    d = _copy(sdar, tmp_path)
    _edit_config(d, block_size=size)
    with pytest.raises(CheckpointError) as err:
        load_hf(d, dtype="float32")
    assert err.value.field == "block_size"


def test_request_block_length_other_than_the_trained_block_is_refused(sdar):
    gen = PublicGenerator.load(sdar, dtype="float32")
    with pytest.raises(InvalidArgument) as err:
        gen.generate("text", "rain", SamplerParams(gen_length=8, steps=8, block_length=8))
    assert err.value.field == "block_length"


def test_missing_shard_is_refused(sdar, tmp_path):
    d = _copy(sdar, tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load_hf(d, dtype="float32")
    assert err.value.field == "weights" and "model-00002-of-00002.safetensors" in err.value.message


def test_shape_mismatch_is_refused(sdar, tmp_path):
    d = _copy(sdar, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.down_proj.weight"
    shard = d / index[name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError) as err:
        load_hf(d, dtype="float32")
    assert err.value.field == "weights" and "shape mismatch" in err.value.message
    assert name in err.value.message


def test_missing_tensor_is_refused(sdar, tmp_path):
    d = _copy(sdar, tmp_path)
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    del index["weight_map"]["model.layers.1.self_attn.q_norm.weight"]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load_hf(d, dtype="float32")
    assert "q_norm" in err.value.message


@pytest.mark.parametrize(
    "request_kwargs, field",
    [
        ({"modality": "midi"}, "modality"),
        ({"modality": "midi", "midi_settings": MidiSettings(bars=2)}, "modality"),
        ({"modality": "text", "params": SamplerParams(use_cache="dual")}, "use_cache"),
    ],
)
def test_our_vocabulary_features_are_refused(sdar, request_kwargs, field):
    gen = Generator.load(sdar, dtype="float32")  # dispatches to the public Generator
    assert isinstance(gen, PublicGenerator)
    with pytest.raises(InvalidArgument) as err:
        gen.prepare(GenerationRequest(**request_kwargs))
    assert err.value.field == field
    assert err.value.code == "INVALID_ARGUMENT"


def test_dream_runs_without_a_cache_only(tmp_path):
    d = write_checkpoint(tmp_path / "dream", "dream")
    gen = PublicGenerator.load(d, dtype="float32")
    with pytest.raises(InvalidArgument) as err:
        gen.generate("text", "rain", SamplerParams(gen_length=8, steps=8, use_cache="prefix"))
    assert err.value.field == "use_cache"
    out = gen.generate("text", "rain", SamplerParams(gen_length=8, steps=4))  # defaults: none
    assert out.generated_tokens <= 8


def test_our_own_model_refuses_chat():
    gen = Generator.load(None, dtype="float32")
    with pytest.raises(InvalidArgument) as err:
        gen.prepare(GenerationRequest(modality="text", chat=(("user", "hi"),)))
    assert err.value.field == "chat"


def test_heads_that_do_not_fit_are_a_checkpoint_error(sdar, tmp_path):
    d = _copy(sdar, tmp_path)
    _edit_config(d, num_key_value_heads=3)  # 4 query heads cannot share 3 KV heads
    with pytest.raises(CheckpointError) as err:
        load_hf(d, dtype="float32")
    assert err.value.field == "n_kv_heads" and "config.json" in err.value.message


def test_our_own_model_describes_itself_for_list_models():
    d = Generator.load(None, dtype="float32").describe()
    assert d["family"] == "unmask" and d["modalities"] == ["text", "code", "midi"]
    assert d["parameters"] > 0 and d["dtype"] == "float32" and d["content_hash"]
