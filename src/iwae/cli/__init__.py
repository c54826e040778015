"""The ``iwae`` command: train, evaluate and sample from importance-weighted autoencoders.

One module per group of commands, each with its commands' parser builders and what they run:
:mod:`iwae.cli.training` (train), :mod:`iwae.cli.evaluation` (evaluate, bdmc, sample) and
:mod:`iwae.cli.experiments` (reproduce, report, toy, snr); :mod:`iwae.cli.options` holds the
parser class, the argument types and the options several commands share.
"""

from __future__ import annotations

import argparse
import sys

from iwae import __version__
from iwae.cli.evaluation import add_bdmc_parser, add_evaluate_parser, add_sample_parser
from iwae.cli.experiments import (
    add_report_parser,
    add_reproduce_parser,
    add_snr_parser,
    add_toy_parser,
    parse_only,
)
from iwae.cli.options import EXIT_TIME_LIMIT, _Parser
from iwae.cli.training import add_train_parser
from iwae.errors import IwaeError, TrainingStopped
from iwae.train import flush_denormals

__all__ = ["EXIT_TIME_LIMIT", "build_parser", "main", "parse_only"]


def build_parser() -> argparse.ArgumentParser:
    """``iwae`` and its commands, in the order ``iwae --help`` lists them."""
    parser = _Parser(
        prog="iwae",
        description="Train and evaluate variational autoencoders with importance-weighted bounds "
        "(Burda et al. 2016; Rainforth et al. 2018).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add_command in (
        add_train_parser,
        add_evaluate_parser,
        add_sample_parser,
        add_reproduce_parser,
        add_report_parser,
        add_toy_parser,
        add_snr_parser,
        add_bdmc_parser,
    ):
        add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``iwae`` on ``argv`` (default: the command line); the exit code: 0, 2 on an error
    (a run directory another process writes included), :data:`EXIT_TIME_LIMIT` when stopped
    by --time-limit, 4 (``iwae reproduce``) when runs failed after their retries, and when
    stopped by a signal 128 + its number: 130 for SIGINT, 143 for SIGTERM (training
    checkpointed at the step in progress)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("train", "evaluate", "snr", "reproduce", "bdmc"):
        flush_denormals(getattr(args, "flush_denormal", True))
    try:
        return args.func(args)
    except IwaeError as e:
        print(f"iwae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # a time limit (EXIT_TIME_LIMIT) or a signal
        print(f"iwae {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("iwae: interrupted", file=sys.stderr)
        return 130
