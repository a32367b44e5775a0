"""The `unmask` command line: one entry point, one subcommand per job.

Each command's parser lives with its folder; only the module of the command being run is
imported, so `unmask --help`, `unmask generate --server …` and `unmask serve` start without
torch (the corpus, tokenizer, training and worker commands import it).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from unmask.errors import UnmaskError

# command -> (module whose add_parsers defines it, one line of help for `unmask --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("unmask.service.cli", "continue a prompt (text, code or MIDI)"),
    "infill": ("unmask.service.cli", "fill [MASK:n] gaps of a template, or bars of a MIDI file"),
    "midi": ("unmask.service.cli", "write a MIDI file: from settings, continuing or rewriting one"),
    "serve": ("unmask.service.cli", "run the gRPC front end (embedded model, or Redis + workers)"),
    "batch": ("unmask.service.cli", "batch jobs on a server: submit | status | results | cancel"),
    "health": (
        "unmask.service.cli",
        "exit 0 if the server (or --worker: this host's worker) is serving",
    ),  # fmt: skip
    "gateway": (
        "unmask.service.cli",
        "HTTP gateway to a server: OpenAI-compatible API, JSON/SSE endpoints, the playground",
    ),  # fmt: skip
    "worker": ("unmask.workers.cli", "serve a model's job queue from Redis (Celery worker)"),
    "train": ("unmask.models.cli", "train the diffusion model or the AR baseline"),
    "eval": ("unmask.models.cli", "held-out likelihood and sample metrics per modality"),
    "data": ("unmask.corpus.cli", "corpus commands (data build)"),
    "tokenize": ("unmask.tokenizers.cli", "print the JSON ids of a text, code or MIDI file"),
    "detokenize": ("unmask.tokenizers.cli", "JSON ids back to text (stdout) or a MIDI file"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` (its module's subcommands only); for anything else, every
    command as a one-line entry, which is all `unmask --help` shows."""
    parser = argparse.ArgumentParser(prog="unmask", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).add_parsers(sub)
        return parser
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UnmaskError as exc:  # the same line whether the server or this process refused it
        text = str(exc) if type(exc).__str__ is not UnmaskError.__str__ else f"{exc.code}: {exc}"
        print(f"unmask: error: {text}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `unmask … | head -1`: the reader has all it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
