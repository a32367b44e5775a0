"""`unmask tokenize` / `detokenize` as a user runs them: exit codes and messages, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def unmask(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unmask", *args], input=stdin, capture_output=True, timeout=120
    )


def test_text_round_trips_through_the_cli(tmp_path):
    text = "Hello\r\n\tworld 😀  "
    (tmp_path / "in.txt").write_bytes(text.encode())
    tok = unmask("tokenize", "--modality", "text", str(tmp_path / "in.txt"))
    assert tok.returncode == 0, tok.stderr
    ids = json.loads(tok.stdout)
    back = unmask("detokenize", stdin=json.dumps(ids).encode())
    assert back.returncode == 0, back.stderr
    assert back.stdout.decode() == text


def test_midi_round_trips_through_the_cli(tmp_path, chorale_midi):
    (tmp_path / "in.mid").write_bytes(chorale_midi)
    tok = unmask("tokenize", "--modality", "midi", str(tmp_path / "in.mid"))
    assert tok.returncode == 0, tok.stderr
    (tmp_path / "ids.json").write_bytes(tok.stdout)
    out = unmask("detokenize", "--out", str(tmp_path / "out.mid"), str(tmp_path / "ids.json"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out.mid").read_bytes()[:4] == b"MThd"


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (["tokenize", "--modality", "video"], b"x", b"unknown modality"),
        (["tokenize", "--modality", "midi"], b"", b"empty"),
        (["tokenize", "--modality", "midi"], b"MThd\x00\x00\x00\x06garbage", b"MIDI"),
        (["tokenize", "--modality", "text", "/no/such/file"], b"", b"no such file"),
        (["detokenize"], b"[1, 2, 99999999]", b"out of range"),
        (["detokenize"], b"not json", b"not JSON"),
        (["detokenize"], b'{"ids": "x"}', b"list of integer ids"),
        (["detokenize"], b"[2, 5, 7, 100]", b"several modality tags"),
    ],
)
def test_bad_input_exits_nonzero_with_a_message_and_no_traceback(args, stdin, message):
    res = unmask(*args, stdin=stdin)
    assert res.returncode != 0
    assert message in res.stderr
    assert b"Traceback" not in res.stderr


def test_midi_ids_without_out_file_ask_for_one(vocab, chorale_midi):
    ids = vocab.encode_midi(chorale_midi)
    res = unmask("detokenize", stdin=json.dumps(ids).encode())
    assert res.returncode != 0 and b"--out" in res.stderr
