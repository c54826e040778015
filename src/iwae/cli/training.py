"""``iwae train``: train one model (new, from a config file, or resumed) into a run directory."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from iwae.bounds import ESTIMATORS, OBJECTIVES
from iwae.cli.options import (
    DATASET_HELP,
    _hidden,
    _latent,
    _positive_int,
    _stages,
    _threads,
    _unit_float,
    add_cuda_graphs,
    add_data_dir,
    add_dataset,
    add_device,
    add_flush_denormal,
    add_overwrite,
    add_precision,
    add_quiet,
    add_seed,
    add_time_limit,
)
from iwae.conv import ARCHITECTURES
from iwae.errors import IwaeError
from iwae.likelihoods import GAUSSIAN_SCALES, LIKELIHOODS, LOG_SCALE_FLOOR
from iwae.train import BINARIZE
from iwae.user_code import is_code_spec

EPILOG_TRAIN = """\
examples:
  iwae train --dataset mnist --layers 1 --objective iwae -k 5 --stages 3 --out runs/iwae-k5
  iwae train --dataset mnist --objective piwae -m 4 -k 16 --stages 4 --out runs/piwae-4-16
  iwae train --dataset omniglot --layers 2 --objective vae -k 50 --epochs 10 --out runs/vae
  iwae train --dataset my_images.npz --latent 20 --hidden 100x100 -k 5 --epochs 50 --out runs/mine
  iwae train --dataset eight_bit.npz --likelihood logistic-256 --arch conv --channels 32,64 \
      --latent 16 -k 5 --epochs 20 --out runs/conv8   (docs/eight-bit.md)

Each example uses M*K importance samples: MIWAE(M,K) and PIWAE(M,K) as in Rainforth et
al. (2018); VAE with -k K averages K log-weights; CIWAE(beta) mixes the VAE and IWAE
bounds of the same K samples. The schedule of Burda et al.: stage i runs 3^i passes at
learning rate 1e-3 * 10^(-i/7); --stages 8 is the paper's 3,280 passes.
"""


def add_train_parser(sub) -> None:
    """``iwae train`` on the subcommands ``sub``: its options in --help order, every default
    suppressed (only options given override --config and TrainConfig's defaults)."""
    t = sub.add_parser(
        "train",
        help="train a model and write a run directory",
        description="Train a VAE/IWAE model and write RUN_DIR (config.json, model.safetensors, "
        "checkpoint.safetensors, metrics.jsonl, tb/, summary.json).",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only options given override --config and the defaults
    )
    t.add_argument(
        "--config",
        metavar="FILE",
        help="TOML, YAML or JSON file with the same keys as these options "
        "(a run's config.json works); options given here override it",
    )
    t.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its checkpoint (a run stopped "
        "before its first checkpoint starts again from its config.json: the same run)",
    )
    _add_model_options(t)
    _add_objective_options(t)
    _add_schedule_options(t)
    _add_monitoring_options(t)
    _add_run_options(t)
    t.set_defaults(func=_train)


def _add_model_options(t: argparse.ArgumentParser) -> None:
    """The data and the architecture."""
    add_dataset(t, f"training data: {DATASET_HELP} (default: mnist)")
    t.add_argument(
        "--binarize",
        choices=BINARIZE,
        help="training images: dynamic draws binary images afresh (pixel ~ Bernoulli(grey value)) "
        "every time they are used; none uses them as they are and needs images that are all 0 or 1 "
        "(the Bernoulli decoder models binary pixels). On 0/1 images dynamic is the same as none. "
        "Default: none for 0/1 images, dynamic for grey ones. Test images are binarized once, with "
        "a fixed seed. Every other --likelihood: none (the images as they are, test images too)",
    )
    t.add_argument(
        "--layers",
        type=int,
        choices=(1, 2),
        help="stochastic layers, Burda et al.'s architectures (default: 1); or --latent with "
        "--hidden",
    )
    t.add_argument(
        "--latent",
        type=_latent,
        metavar="SIZES",
        help="any architecture: units of each stochastic layer from x up, e.g. 100,50 (with "
        "--hidden; --layers, if also given, must equal the number of entries)",
    )
    t.add_argument(
        "--hidden",
        type=_hidden,
        metavar="SIZES",
        help="the tanh hidden layers before each stochastic layer, one x-separated list per "
        "--latent entry, e.g. 200x200,100x100 (the decoder mirrors them)",
    )
    _add_likelihood_options(t)


def _add_likelihood_options(t: argparse.ArgumentParser) -> None:
    """p(x | h) and the convolutional architecture."""
    t.add_argument(
        "--likelihood",
        choices=tuple(LIKELIHOODS),
        help="p(x | h): bernoulli (binary pixels, the default), continuous-bernoulli (grey "
        "values in [0, 1]), gaussian (real values), logistic-256 (8-bit data: a .npz of uint8 "
        "levels 0-255 or 8-bit PNGs is read as v / 255; bits per dimension in evaluate). "
        "Every likelihood but bernoulli takes the images as they are (--binarize none)",
    )
    t.add_argument(
        "--gaussian-scale",
        choices=GAUSSIAN_SCALES,
        help="with --likelihood gaussian: decoder gives each pixel's log sigma with its mean "
        "(the default), learned has one log sigma per pixel for all images; either way log "
        f"sigma is floored smoothly at log 1e-3 = {LOG_SCALE_FLOOR:.3f} "
        "(iwae.likelihoods.LOG_SCALE_FLOOR)",
    )
    t.add_argument(
        "--arch",
        choices=ARCHITECTURES,
        help="mlp: Burda et al.'s tanh MLPs (the default; --layers or --latent/--hidden); conv: "
        "strided convolutions (kernel 4, stride 2, padding 1) down to one Gaussian layer of "
        "--latent units (default 50) and transposed convolutions back up, for images of any "
        "H x W (iwae.conv)",
    )
    t.add_argument(
        "--channels",
        metavar="WIDTHS",
        help="with --arch conv: the channels of each strided convolution, e.g. 32,64 (the "
        "default; each halves the image's sides)",
    )


def _objective(text: str) -> str:
    """A built-in objective's name or code named ``file.py:function``/``module:function``."""
    if text in OBJECTIVES or is_code_spec(text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither one of {', '.join(OBJECTIVES)} nor a bound in code "
        "(path/file.py:function or package.module:function)"
    )


def _objective_param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. alpha=0.5), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_objective_options(t: argparse.ArgumentParser) -> None:
    """The bound, its samples and the encoder's gradient estimator."""
    t.add_argument(
        "--objective",
        type=_objective,
        metavar="NAME|FILE.py:FUNCTION|MODULE:FUNCTION",
        help=f"bound to maximize: {', '.join(OBJECTIVES)} (default: iwae), or a bound of your "
        "own, a function of the [S, B] log-weights returning [B], named by its file or module "
        "(e.g. examples/renyi.py:bound). Its code runs as `python FILE.py` would; the run "
        "records the file's SHA-256, and --resume and evaluate refuse a file changed since",
    )
    t.add_argument(
        "--objective-param",
        type=_objective_param,
        action="append",
        metavar="KEY=VALUE",
        dest="objective_params",
        help="a keyword argument of a bound of your own, e.g. alpha=0.5 (repeatable; values are "
        "read as JSON where they parse, else as text)",
    )
    t.add_argument("-k", type=_positive_int, help="importance samples per group (default: 1)")
    t.add_argument(
        "-m", type=_positive_int, help="groups of k samples, for miwae and piwae (default: 1)"
    )
    t.add_argument("--beta", type=_unit_float, help="CIWAE mixing weight in [0, 1] (default: 0.5)")
    t.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        help="encoder gradient estimator: reparam, stl (Roeder et al.) or dreg (Tucker et al.) "
        "(default: reparam)",
    )


def _add_schedule_options(t: argparse.ArgumentParser) -> None:
    """How long and how to optimize, on which training images."""
    budget = t.add_mutually_exclusive_group()
    budget.add_argument(
        "--stages",
        type=_stages,
        help="run the first N stages of the 3^i schedule (default: 8, the paper's 3,280 passes)",
    )
    budget.add_argument(
        "--epochs", type=_positive_int, help="instead, N passes at a constant learning rate --lr"
    )
    add_seed(t)
    t.add_argument("--batch-size", type=_positive_int, help="examples per step (default: 20)")
    t.add_argument("--lr", type=float, help="initial learning rate (default: 1e-3)")
    t.add_argument(
        "--beta1", type=float, help="Adam beta1 (default: 0.9; the original code used 0.99)"
    )
    t.add_argument(
        "--scale", choices=("exp", "softplus"), help="Gaussian std parameterization (default: exp)"
    )
    add_precision(t)
    t.add_argument(
        "--validation",
        action="store_true",
        help="hold out Burda's 400 validation images (MNIST: train on 59,600)",
    )
    t.add_argument(
        "--n-train",
        type=_positive_int,
        help="train on the first N training images only (quick checks)",
    )


def _add_monitoring_options(t: argparse.ArgumentParser) -> None:
    """What training logs and checks, and when it checkpoints."""
    t.add_argument(
        "--eval-every",
        type=_positive_int,
        help="log the test IWAE-64 bound every N passes (default: 10)",
    )
    t.add_argument(
        "--eval-n",
        type=_positive_int,
        help="test images used for that bound: a seeded random subset (default: 1000)",
    )
    t.add_argument(
        "--stage-nll-k",
        type=int,
        help="at each stage end, log the test NLL with this many importance samples on the same "
        "test subset (metrics.jsonl: test_nll_subset; 0: off; default: 5000)",
    )
    t.add_argument(
        "--checkpoint-minutes",
        type=float,
        help="minutes between checkpoints, besides each stage end (default: 5)",
    )
    t.add_argument(
        "--max-bad-steps",
        type=_positive_int,
        help="stop after N consecutive steps with a non-finite bound or gradient (default: 20)",
    )


def _add_run_options(t: argparse.ArgumentParser) -> None:
    """Where and how to run: not training configuration (config.json does not record them,
    except --data-dir)."""
    add_data_dir(
        t,
        "; with --resume: where the run's data is now, if it moved "
        "(default: the one the run was trained with)",
    )
    add_device(t)
    t.add_argument(
        "--threads",
        type=_threads,
        help="CPU threads, or auto: 1 when batch size x samples per example < 256 (small steps run "
        "faster on one thread), else all cores; auto leaves an OMP_NUM_THREADS setting alone "
        "(default: auto)",
    )
    add_overwrite(t, "an existing run in --out")
    add_quiet(t)
    t.add_argument("--out", help="run directory to create (with its missing parents)")
    add_flush_denormal(t)
    add_cuda_graphs(t)
    add_time_limit(t, "iwae train --resume RUN")


#: train's options that configure the run, not the training: left out of TrainConfig
_RUNTIME_OPTIONS = {
    "func",
    "command",
    "config",
    "resume",
    "device",
    "overwrite",
    "quiet",
    "out",
    "threads",
    "flush_denormal",
    "cuda_graphs",
    "time_limit",
}


def _train(args) -> int:
    """iwae train (new or --resume), leaving torch's thread count as it found it."""
    threads = torch.get_num_threads()
    try:
        return _train_run(args)
    finally:  # main() may be called in-process (tests, notebooks): leave torch as it was
        torch.set_num_threads(threads)


# _train_run imports iwae.train's functions when it runs, not at the top of this module: tests
# replace iwae.train.train, resume and load_config on the module (monkeypatch), which a name
# imported here at start-up would not see.
def _train_run(args) -> int:
    from iwae.checkpoint import checkpoint_exists
    from iwae.train import TrainConfig, load_config, read_config_file, resume, train

    given = {key: value for key, value in vars(args).items() if key not in _RUNTIME_OPTIONS}
    if "objective_params" in given:  # [(key, value), ...] from --objective-param
        given["objective_params"] = dict(given["objective_params"])
    progress, device = not getattr(args, "quiet", False), getattr(args, "device", "auto")
    cuda_graphs = getattr(args, "cuda_graphs", "auto")
    limit = getattr(args, "time_limit", None)
    stop_at = None if limit is None else time.time() + 60 * limit
    if getattr(args, "resume", None):
        data_dir = given.pop("data_dir", None)
        if given or hasattr(args, "config") or hasattr(args, "out"):
            raise IwaeError(
                "--resume takes the run's own configuration: give only --resume RUN_DIR "
                "[--data-dir] [--device] [--threads] [--cuda-graphs] [--time-limit] [--quiet]"
            )
        config = load_config(args.resume)
        _set_threads(getattr(args, "threads", "auto"), config)
        if not checkpoint_exists(args.resume):
            print(
                f"note: {args.resume} has no checkpoint (stopped before its first): the run "
                "starts again from its config.json",
                file=sys.stderr,
            )
        summary = resume(
            args.resume,
            progress=progress,
            device=device,
            cuda_graphs=cuda_graphs,
            data_dir=data_dir,
            stop_at=stop_at,
            fallback=True,  # a bad newest checkpoint: the previous one, saying so
        )
        out = args.resume
    else:
        file_keys = read_config_file(args.config) if hasattr(args, "config") else {}
        config, out = TrainConfig.from_sources(file_keys, given, getattr(args, "out", None))
        _set_threads(getattr(args, "threads", "auto"), config)
        summary = train(
            config,
            out,
            progress=progress,
            overwrite=getattr(args, "overwrite", False),
            device=device,
            cuda_graphs=cuda_graphs,
            stop_at=stop_at,
        )
    test = summary["final_test_iwae64"]
    if test is None:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    print(
        f"trained {config.objective_spec} on {config.dataset} for {summary['passes']} passes "
        f"in {summary['train_seconds']:.0f} s: train bound {summary['final_train_bound']:.2f}, "
        f"test IWAE-64 {test:.2f} ({summary['test_iwae64_n']} test images) -> {out}"
    )
    return 0


def _set_threads(threads: int | str, config) -> None:
    """torch's CPU threads for training: a number, or auto (:func:`iwae.train.auto_threads`;
    an OMP_NUM_THREADS setting, e.g. torchrun's, is left as it is)."""
    import torch

    from iwae.train import auto_threads

    if threads == "auto":
        if "OMP_NUM_THREADS" in os.environ:
            return
        threads = auto_threads(config.rows_per_step)
    torch.set_num_threads(threads)
