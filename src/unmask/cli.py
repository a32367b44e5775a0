"""The `unmask` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from unmask.errors import UnmaskError


def build_parser() -> argparse.ArgumentParser:
    from unmask.corpus import cli as corpus_cli
    from unmask.models import cli as models_cli
    from unmask.tokenizers import cli as tokenizers_cli

    parser = argparse.ArgumentParser(prog="unmask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tokenizers_cli.add_parsers(sub)
    corpus_cli.add_parsers(sub)
    models_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
