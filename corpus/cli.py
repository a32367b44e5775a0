"""`unmask data build`: build the training corpus from installed packages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unmask.corpus.build import BuildConfig, build


def cmd_build(args: argparse.Namespace) -> int:
    cfg = BuildConfig(
        out_dir=Path(args.out),
        vocab_dir=Path(args.vocab) if args.vocab else None,
        train_vocab=args.train_vocab,
        bpe_size=args.bpe_size,
        small=args.small,
        sources=args.sources.split(",") if args.sources else None,
        progress=not args.quiet,
    )
    manifest = build(cfg)
    for line in cfg.log:
        print(line)
    print(
        json.dumps(
            {
                "out": str(cfg.out_dir),
                "totals": manifest["totals"],
                "skipped": manifest["skipped"],
                "seconds": manifest["build_seconds"],
            }
        )
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="corpus commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("build", help="read sources, tokenize, write shards + manifest")
    p.add_argument("--out", default="data/corpus", help="corpus directory (default data/corpus)")
    p.add_argument("--vocab", default=None, help="vocabulary dir (default: the shipped one)")
    p.add_argument("--train-vocab", action="store_true", help="train a new BPE into --vocab")
    p.add_argument("--bpe-size", type=int, default=8192)
    p.add_argument("--small", action="store_true", help="a few documents per source (tests)")
    p.add_argument("--sources", default=None, help="comma-separated source names (default all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build)
