"""`unmask tokenize` / `unmask detokenize`: the vocabulary from the shell, as JSON ids."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unmask.errors import TokenizerError
from unmask.tokenizers.specials import BOS_ID, EOS_ID
from unmask.tokenizers.vocab import UnifiedVocab, check_modality


def _read_input(path: str | None, binary: bool) -> str | bytes:
    if path in (None, "-"):
        stream = sys.stdin.buffer
        data = stream.read()
    else:
        p = Path(path)
        if not p.is_file():
            raise TokenizerError(f"no such file: {path}", field="FILE", value=path)
        data = p.read_bytes()
    if binary:
        return data
    try:
        return data.decode("utf-8")  # bytes → str without newline translation: CRLF survives
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"input is not UTF-8 text ({exc.reason})", field="FILE") from exc


def cmd_tokenize(args: argparse.Namespace) -> int:
    modality = check_modality(args.modality)
    vocab = UnifiedVocab.load(args.vocab)
    content = _read_input(args.file, binary=modality == "midi")
    ids = vocab.encode(content, modality)
    if not args.bare:
        ids = [BOS_ID, vocab.tag_id(modality), *ids, EOS_ID]
    print(json.dumps(ids))
    return 0


def _parse_ids(raw: str) -> list[int]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"input is not JSON: {exc.msg}", field="ids") from exc
    if isinstance(data, dict):
        data = data.get("ids")
    if not isinstance(data, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in data
    ):
        raise TokenizerError("expected a JSON list of integer ids", field="ids")
    return data


def cmd_detokenize(args: argparse.Namespace) -> int:
    vocab = UnifiedVocab.load(args.vocab)
    ids = _parse_ids(_read_input(args.file, binary=False))  # type: ignore[arg-type]
    out = vocab.decode(ids, modality=args.modality)
    if isinstance(out, bytes):
        if not args.out:
            raise TokenizerError("these ids decode to MIDI; pass --out FILE.mid", field="--out")
        Path(args.out).write_bytes(out)
        print(f"wrote {args.out} ({len(out)} bytes)", file=sys.stderr)
    elif args.out:
        Path(args.out).write_bytes(out.encode("utf-8"))
    else:
        sys.stdout.buffer.write(out.encode("utf-8"))
        sys.stdout.flush()
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="print the JSON ids of a text, code or MIDI file")
    p.add_argument("--modality", default="text", help="text | code | midi (default: text)")
    p.add_argument("--vocab", default=None, help="vocabulary directory (default: shipped)")
    p.add_argument("--bare", action="store_true", help="content ids only (no BOS/tag/EOS)")
    p.add_argument("file", nargs="?", help="input file (default: stdin; MIDI: a .mid file)")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("detokenize", help="JSON ids back to text (stdout) or a MIDI file")
    p.add_argument("--out", help="write to FILE (required for MIDI)")
    p.add_argument("--modality", default=None, help="override the modality the ids carry")
    p.add_argument("--vocab", default=None, help="vocabulary directory (default: shipped)")
    p.add_argument("file", nargs="?", help="JSON ids (default: stdin)")
    p.set_defaults(func=cmd_detokenize)
