"""bench/sampler_sweep.py's custom grid: parsing, and how a setting becomes decoding knobs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sampler_sweep as sw


def _args(**kw) -> argparse.Namespace:
    base = dict(model="m", ar_model="ar", corpus="c", samples=8, seed=0, gen_length=128,
                threads=1)  # fmt: skip
    return argparse.Namespace(**(base | kw))


def test_grid_list_applies_to_every_modality_and_mapping_per_modality(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps([{"temperature": 1.0}]))
    assert sw.load_grid(path, ["code", "midi"]) == {
        "code": [{"temperature": 1.0}],
        "midi": [{"temperature": 1.0}],
    }
    path.write_text(json.dumps({"midi": [{"top_p": 0.9, "samples": 16}]}))
    assert sw.load_grid(path, ["code", "midi"]) == {
        "code": [],
        "midi": [{"top_p": 0.9, "samples": 16}],
    }


def test_grid_rejects_unknown_knobs(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps([{"temprature": 1.0, "ar": False}]))
    with pytest.raises(ValueError, match="temprature"):
        sw.load_grid(path, ["midi"])


def test_setting_becomes_eval_config_and_sampler_params():
    s = {"position_score": "probability", "tokens_per_step": 3, "temperature": 1.3,
         "top_p": 0.95, "top_k": 20, "remask_budget": 4, "samples": 16, "seed": 5}  # fmt: skip
    cfg = sw.eval_config(_args(), "midi", s, ar=False)
    assert cfg.n_samples == cfg.function_headers == 16
    assert sw.eval_config(_args(), "code", {"headers": 30}, ar=False).function_headers == 30
    assert cfg.prompt_tokens == 16
    assert sw.eval_config(_args(), "midi", {"prompt_tokens": 0}, ar=False).prompt_tokens == 0
    assert cfg.split == "val" and cfg.modalities == ("midi",) and cfg.ar_model is None
    assert cfg.steps == 43  # ceil(128 / 3)
    p = cfg.sampler_params(2)
    assert (p.temperature, p.top_p, p.top_k, p.remask_budget) == (1.3, 0.95, 20, 4)
    assert p.position_score == "probability" and p.seed == 7
    for knob in ("top_k", "remask_budget", "temperature", "steps", "position_score"):
        assert knob not in p.unset
    assert "remask_threshold" in p.unset  # left to the model's own default


def test_setting_without_knobs_keeps_model_defaults():
    cfg = sw.eval_config(_args(), "code", {}, ar=True)
    assert cfg.ar_model == "ar" and cfg.steps is None and cfg.temperature is None
    p = cfg.sampler_params(0)
    assert {"steps", "temperature", "top_p", "top_k", "position_score"} <= set(p.unset)


def test_default_grid_is_unchanged():
    assert len(sw.settings(quick=False)) == 12 and len(sw.settings(quick=True)) == 5
