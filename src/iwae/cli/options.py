"""What the ``iwae`` commands' parsers share: the parser class, the argument types, and the
options several commands take, each one's flag, default and help text written once here.

A command's builder adds its options in the order its ``--help`` lists them, calling the
``add_*`` helpers below for the shared ones. ``iwae train``'s parser has
``argument_default=SUPPRESS`` (only options given override ``--config`` and the defaults), so
the helpers give it no default of their own (:func:`_default`); the help texts name the default
that applies.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from iwae.bounds import ESTIMATORS
from iwae.config import PRECISIONS
from iwae.errors import IwaeError, TimeLimitReached
from iwae.model import parse_hidden, parse_latent
from iwae.train import CUDA_GRAPHS

#: the exit code of a command stopped by --time-limit: the same command continues
EXIT_TIME_LIMIT = TimeLimitReached.exit_code
#: the exit code of ``iwae reproduce`` when runs failed (after their retries); the others ran
EXIT_RUNS_FAILED = 4

QUIET_HELP = (
    "no progress report (otherwise: a progress bar on a terminal, and where stderr is not a "
    "terminal one plain line every 30 s: done/total, rate, ETA)"
)

#: ``--dataset``'s metavar: a built-in set or the path of one's own images
DATASET_METAVAR = "{mnist,omniglot,PATH}"

#: what ``--dataset`` accepts (iwae train, iwae snr)
DATASET_HELP = (
    "mnist, omniglot, or PATH to your own images: an .npz file with arrays train and test "
    "(optionally validation) of shape [N, H, W] or [N, D] and values in [0, 1], or a directory "
    "with train/ and test/ (optionally validation/) of PNG images of one size (pixel / 255, "
    "white = 1)"
)

DATA_DIR_HELP = (
    "data directory holding mnist/ and omniglot/ (default: $IWAE_DATA, else a user cache directory)"
)

DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: auto)"

FLUSH_DENORMAL_HELP = (
    "flush denormal floats to zero on the CPU (default: on; several times faster matmuls on some "
    "Intel CPUs, results unchanged)"
)

CUDA_GRAPHS_HELP = (
    "on a GPU, capture each training step once as a CUDA graph and replay it (one launch per "
    "step; the same random numbers as without, results equal up to rounding): auto = on for a "
    "CUDA run, off = never (default: auto)"
)

#: ``--ais-init``'s choices: AIS's annealing path starts from the encoder's q(h|x) or the prior
AIS_INITS = ("q", "prior")


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line on stderr, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _threads(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _stages(text: str) -> int:
    value = _positive_int(text)
    if value > 8:
        raise argparse.ArgumentTypeError(f"the schedule has 8 stages, got {value}")
    return value


def _latent(text: str) -> list[int]:
    try:
        return list(parse_latent(text))
    except IwaeError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--latent: ")) from None


def _hidden(text: str) -> list[list[int]]:
    try:
        return [list(h) for h in parse_hidden(text)]
    except IwaeError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--hidden: ")) from None


def _existing_run(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"run directory {text} does not exist")
    return path


def _k_list(text: str) -> list[int]:
    ks = [_positive_int(part.strip()) for part in text.split(",")]
    if len(set(ks)) != len(ks):
        raise argparse.ArgumentTypeError(f"repeated K in {text!r}")
    return ks


def _estimator_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    for name in names:
        if name not in ESTIMATORS:
            raise argparse.ArgumentTypeError(
                f"unknown estimator {name!r}: choose among {', '.join(ESTIMATORS)}"
            )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"repeated estimator in {text!r}")
    return names


def _default(parser: argparse.ArgumentParser, value):
    """``value`` as an option's default, except on a parser whose options default to
    ``argparse.SUPPRESS`` (iwae train: an option not given leaves no attribute)."""
    return argparse.SUPPRESS if parser.argument_default == argparse.SUPPRESS else value


def add_run_dir(parser: argparse.ArgumentParser, **kwargs) -> None:
    """The positional RUN_DIR (``kwargs``: e.g. ``nargs="?"`` where it is one of several
    sources)."""
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        type=_existing_run,
        help="a directory written by `iwae train`",
        **kwargs,
    )


def add_seed(parser: argparse.ArgumentParser, what: str = "random seed") -> None:
    """``--seed`` (default 0); ``what`` says what it seeds."""
    parser.add_argument(
        "--seed", type=int, default=_default(parser, 0), help=f"{what} (default: 0)"
    )


def add_data_dir(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--data-dir``; ``note`` adds what it means for this command (e.g. a run's default)."""
    parser.add_argument("--data-dir", help=DATA_DIR_HELP + note)


def add_dataset(parser: argparse.ArgumentParser, text: str) -> None:
    """``--dataset`` (a built-in set or PATH), with this command's help ``text``."""
    parser.add_argument("--dataset", metavar=DATASET_METAVAR, help=text)


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=_default(parser, "auto"), help=DEVICE_HELP)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite``: replace ``what`` (this command's outputs) where it exists."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what}")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def add_flush_denormal(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flush-denormal",
        action=argparse.BooleanOptionalAction,
        default=_default(parser, True),
        help=FLUSH_DENORMAL_HELP,
    )


def add_cuda_graphs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cuda-graphs",
        choices=CUDA_GRAPHS,
        default=_default(parser, "auto"),
        help=CUDA_GRAPHS_HELP,
    )


def add_time_limit(parser: argparse.ArgumentParser, continued_by: str, note: str = "") -> None:
    """``--time-limit MINUTES``: ``continued_by`` is the command that continues the stopped
    work; ``note`` adds what the limit means for this command."""
    parser.add_argument(
        "--time-limit",
        type=_positive_float,
        default=_default(parser, None),
        metavar="MINUTES",
        help="stop training after this many minutes (wall clock), every run in training "
        f"checkpointed at the step it reached, and exit with code {EXIT_TIME_LIMIT}: "
        f"{continued_by} continues (for batch-system jobs and time-limited machines; "
        "default: no limit)" + note,
    )


def add_precision(p: argparse.ArgumentParser) -> None:
    """``--precision``: the arithmetic of the networks in training steps (:mod:`iwae.precision`);
    not given: the configuration's (auto)."""
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=_default(p, None),
        help="training steps' arithmetic: fp32, or bf16 (the encoder and decoder networks under "
        "bfloat16 autocast; log-weights, bounds and Adam in float32), or auto: bf16 where the "
        "hardware has it natively (AVX512-BF16 or AMX, a GPU) and a timing of both on the run's "
        "model shape at the start finds it faster. The run records the precision used and "
        "resumes in it; evaluation is always fp32 (default: auto)",
    )
