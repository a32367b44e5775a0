"""The `unmask` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from unmask.errors import UnmaskError


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands; for a service command only its own parser, so that `unmask serve`
    starts without importing torch (the corpus and training commands import it)."""
    from unmask.service import cli as service_cli

    parser = argparse.ArgumentParser(prog="unmask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    if command in service_cli.COMMANDS:
        service_cli.add_parsers(sub)
        return parser

    from unmask.corpus import cli as corpus_cli
    from unmask.models import cli as models_cli
    from unmask.tokenizers import cli as tokenizers_cli
    from unmask.workers import cli as workers_cli

    tokenizers_cli.add_parsers(sub)
    corpus_cli.add_parsers(sub)
    models_cli.add_parsers(sub)
    workers_cli.add_parsers(sub)
    service_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UnmaskError as exc:
        print(f"unmask: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
