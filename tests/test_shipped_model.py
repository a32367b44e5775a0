"""The shipped default model and AR baseline work offline from a fresh clone, as a user runs them."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import mido
import pytest

from unmask.models.generation import default_model_dir
from unmask.models.template import parse_template
from unmask.tokenizers.vocab import UnifiedVocab

MODELS = [default_model_dir("model"), default_model_dir("model-ar")]


def unmask(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unmask", *args], capture_output=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.name)
def test_shipped_model_is_small_and_matches_the_shipped_vocabulary(model):
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    assert size <= 50 * 1024 * 1024
    assert (model / "MODEL_CARD.md").read_text().count("Tokens seen") == 1
    assert UnifiedVocab.load(model / "vocab").content_hash == UnifiedVocab.load().content_hash


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.name)
@pytest.mark.parametrize("modality, prompt", [("text", "It was a"), ("code", "def main(")])
def test_generate_text_and_code_offline(model, modality, prompt):
    res = unmask("generate", "--model", str(model), "--modality", modality, "--prompt", prompt,
                 "--length", "32", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    assert b'"output": ' in res.stdout
    assert prompt.encode() in res.stdout


def test_generate_midi_file_offline(tmp_path):
    out = tmp_path / "song.mid"
    res = unmask("generate", "--modality", "midi", "--length", "128", "--steps", "32",
                 "--seed", "1", "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    mid = mido.MidiFile(file=io.BytesIO(out.read_bytes()))
    assert any(m.type == "note_on" and m.velocity > 0 for t in mid.tracks for m in t)


def test_infill_keeps_the_template_and_fills_every_gap(tmp_path):
    template = 'def add(a, b):\n    """[MASK:6]"""\n    return [MASK:4]\n\nprint(add(1, 2))\n'
    res = unmask("infill", "--modality", "code", template, "--json")
    assert res.returncode == 0, res.stderr.decode()
    out = json.loads(res.stdout)
    parts = parse_template(template)
    gaps = [p for p in parts if isinstance(p, int)]
    assert len(gaps) == 2 and out["usage"]["generated_tokens"] == sum(gaps)
    # every fixed part kept byte for byte and in order; each gap is what lies between them
    pattern = "".join(re.escape(p) if isinstance(p, str) else "(.+?)" for p in parts)
    m = re.fullmatch(pattern, out["output"], re.DOTALL)
    assert m, f"the fixed parts of the template are not all kept in order: {out['output']!r}"
    vocab = UnifiedVocab.load()
    for n, filled in zip(gaps, m.groups(), strict=True):
        assert filled.strip() and "[MASK" not in filled and "<mask>" not in filled, filled
        assert 1 <= len(vocab.encode_text(filled)) <= n, (n, filled)


def test_the_demo_writes_text_code_and_midi(tmp_path):
    res = subprocess.run([sys.executable, "-m", "unmask.demo", "--out", str(tmp_path)],
                         capture_output=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    assert (tmp_path / "sample.txt").read_text().startswith("It is a truth")
    assert (tmp_path / "sample.py").read_text().startswith("def read_config")
    mid = mido.MidiFile(file=io.BytesIO((tmp_path / "sample.mid").read_bytes()))
    assert any(m.type == "note_on" for t in mid.tracks for m in t)
