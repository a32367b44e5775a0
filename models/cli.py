"""`unmask train | eval`: the model's own commands (they import torch).

Generation from the command line (`unmask generate | infill | midi`) lives in service/cli.py:
one request path, in-process or through a server.
"""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from unmask.models.evaluate import add_eval_args
    from unmask.models.train import add_train_args

    p = sub.add_parser("train", help="train the diffusion model or the AR baseline")
    add_train_args(p)

    p = sub.add_parser("eval", help="held-out likelihood and sample metrics per modality")
    add_eval_args(p)
