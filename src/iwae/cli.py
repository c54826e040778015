"""The ``iwae`` command: train, evaluate and sample from importance-weighted autoencoders."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from iwae.bounds import ESTIMATORS, OBJECTIVES
from iwae.errors import IwaeError, TimeLimitReached
from iwae.train import BINARIZE, CUDA_GRAPHS

EPILOG_TRAIN = """\
examples:
  iwae train --dataset mnist --layers 1 --objective iwae -k 5 --stages 3 --out runs/iwae-k5
  iwae train --dataset mnist --objective piwae -m 4 -k 16 --stages 4 --out runs/piwae-4-16
  iwae train --dataset omniglot --layers 2 --objective vae -k 50 --epochs 10 --out runs/vae
  iwae train --dataset my_images.npz --latent 20 --hidden 100x100 -k 5 --epochs 50 --out runs/mine

Each example uses M*K importance samples: MIWAE(M,K) and PIWAE(M,K) as in Rainforth et
al. (2018); VAE with -k K averages K log-weights; CIWAE(beta) mixes the VAE and IWAE
bounds of the same K samples. The schedule of Burda et al.: stage i runs 3^i passes at
learning rate 1e-3 * 10^(-i/7); --stages 8 is the paper's 3,280 passes.
"""

QUIET_HELP = (
    "no progress report (otherwise: a progress bar on a terminal, and where stderr is not a terminal one "
    "plain line every 30 s: done/total, rate, ETA)"
)


#: iwae evaluate --method ais: annealing steps, chains per image, leapfrog steps per HMC transition
AIS_DEFAULTS = {"steps": 1000, "chains": 16, "leapfrog": 10}


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line on stderr, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


#: ``--time-limit``'s help; the exit code of a command stopped there
TIME_LIMIT_HELP = (
    "stop training after this many minutes (wall clock), every run in training checkpointed at the "
    "step it reached, and exit with code 3: the same command continues (for batch-system jobs and "
    "lent machines; default: no limit)"
)
EXIT_TIME_LIMIT = 3


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
    from iwae.model import parse_latent

    try:
        return list(parse_latent(text))
    except IwaeError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--latent: ")) from None


def _hidden(text: str) -> list[list[int]]:
    from iwae.model import parse_hidden

    try:
        return [list(h) for h in parse_hidden(text)]
    except IwaeError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--hidden: ")) from None


def _existing_run(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"run directory {text} does not exist")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="iwae",
        description="Train and evaluate variational autoencoders with importance-weighted bounds "
        "(Burda et al. 2016; Rainforth et al. 2018).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    data_help = "data directory holding mnist/ and omniglot/ (default: $IWAE_DATA, else a user cache directory)"
    cuda_graphs_help = (
        "on a GPU, capture each training step once as a CUDA graph and replay it (one launch per "
        "step; the same random numbers as without, results equal up to rounding): auto = on for a "
        "CUDA run, off = never (default: auto)"
    )
    dataset_help = (
        "mnist, omniglot, or PATH to your own images: an .npz file with arrays train and test (optionally "
        "validation) of shape [N, H, W] or [N, D] and values in [0, 1], or a directory with train/ and "
        "test/ (optionally validation/) of PNG images of one size (pixel / 255, white = 1)"
    )

    t = sub.add_parser(
        "train",
        help="train a model and write a run directory",
        description="Train a VAE/IWAE model and write RUN_DIR (config.json, model.safetensors, checkpoint.safetensors, "
        "metrics.jsonl, tb/, summary.json).",
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
    t.add_argument(
        "--dataset",
        metavar="{mnist,omniglot,PATH}",
        help=f"training data: {dataset_help} (default: mnist)",
    )
    t.add_argument(
        "--binarize",
        choices=BINARIZE,
        help="training images: dynamic draws binary images afresh (pixel ~ Bernoulli(grey value)) every "
        "time they are used; none uses them as they are and needs images that are all 0 or 1 (the "
        "Bernoulli decoder models binary pixels). On 0/1 images dynamic is the same as none. Default: none "
        "for 0/1 images, dynamic for grey ones. Test images are binarized once, with a fixed seed",
    )
    t.add_argument(
        "--layers",
        type=int,
        choices=(1, 2),
        help="stochastic layers, Burda et al.'s architectures (default: 1); or --latent with --hidden",
    )
    t.add_argument(
        "--latent",
        type=_latent,
        metavar="SIZES",
        help="any architecture: units of each stochastic layer from x up, e.g. 100,50 (with --hidden; "
        "--layers, if also given, must equal the number of entries)",
    )
    t.add_argument(
        "--hidden",
        type=_hidden,
        metavar="SIZES",
        help="the tanh hidden layers before each stochastic layer, one x-separated list per --latent "
        "entry, e.g. 200x200,100x100 (the decoder mirrors them)",
    )
    t.add_argument("--objective", choices=OBJECTIVES, help="bound to maximize (default: iwae)")
    t.add_argument("-k", type=_positive_int, help="importance samples per group (default: 1)")
    t.add_argument(
        "-m", type=_positive_int, help="groups of k samples, for miwae and piwae (default: 1)"
    )
    t.add_argument("--beta", type=_unit_float, help="CIWAE mixing weight in [0, 1] (default: 0.5)")
    t.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        help="encoder gradient estimator: reparam, stl (Roeder et al.) or dreg (Tucker et al.) (default: reparam)",
    )
    budget = t.add_mutually_exclusive_group()
    budget.add_argument(
        "--stages",
        type=_stages,
        help="run the first N stages of the 3^i schedule (default: 8, the paper's 3,280 passes)",
    )
    budget.add_argument(
        "--epochs", type=_positive_int, help="instead, N passes at a constant learning rate --lr"
    )
    t.add_argument("--seed", type=int, help="random seed (default: 0)")
    t.add_argument("--batch-size", type=_positive_int, help="examples per step (default: 20)")
    t.add_argument("--lr", type=float, help="initial learning rate (default: 1e-3)")
    t.add_argument(
        "--beta1", type=float, help="Adam beta1 (default: 0.9; the original code used 0.99)"
    )
    t.add_argument(
        "--scale", choices=("exp", "softplus"), help="Gaussian std parameterization (default: exp)"
    )
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
        help="at each stage end, log the test NLL with this many importance samples on the same test subset "
        "(metrics.jsonl: test_nll_subset; 0: off; default: 5000)",
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
    t.add_argument(
        "--data-dir",
        help=data_help + "; with --resume: where the run's data is now, if it moved "
        "(default: the one the run was trained with)",
    )
    t.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    t.add_argument(
        "--threads",
        type=_threads,
        help="CPU threads, or auto: 1 when batch size x samples per example < 256 (small steps run faster "
        "on one thread), else all cores; auto leaves an OMP_NUM_THREADS setting alone (default: auto)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    t.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    t.add_argument("--out", help="run directory to create (with its missing parents)")
    t.add_argument(
        "--flush-denormal",
        action=argparse.BooleanOptionalAction,
        help="flush denormal floats to zero on the CPU (default: on; several times faster matmuls on some "
        "Intel CPUs, results unchanged)",
    )
    t.add_argument(
        "--cuda-graphs", choices=CUDA_GRAPHS, default=argparse.SUPPRESS, help=cuda_graphs_help
    )
    t.add_argument(
        "--time-limit",
        type=_positive_float,
        default=argparse.SUPPRESS,
        metavar="MINUTES",
        help=TIME_LIMIT_HELP.replace(
            "the same command continues", "iwae train --resume RUN continues"
        ),
    )
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "evaluate",
        help="test NLL (L_5000), IWAE-64, log p-hat(x), -KL(Q||P), ELBO and active units",
        description="Evaluate a trained run on its test set: NLL = -mean L_k with its standard error, "
        "IWAE-64, log p-hat(x) = mean L_k, -KL(Q||P) = IWAE-64 - log p-hat(x), the ELBO and the active units per layer. "
        "The test images are binarized once with a fixed seed. The result is also written to RUN_DIR/evaluation.json, "
        "and the per-image values (L_k, IWAE-64, ELBO and each image's index in the test set) to "
        "RUN_DIR/evaluation.safetensors.",
    )
    e.add_argument(
        "run_dir", metavar="RUN_DIR", type=_existing_run, help="a directory written by `iwae train`"
    )
    e.add_argument(
        "--k",
        "-k",
        type=_positive_int,
        default=5000,
        help="importance samples per test image (default: 5000)",
    )
    e.add_argument(
        "--n-test",
        type=_positive_int,
        help="evaluate on a seeded random subset of N test images "
        "(the same subset for every run of a dataset; its seed is in evaluation.json; default: all)",
    )
    e.add_argument(
        "--seed", type=int, default=0, help="seed of the importance samples (default: 0)"
    )
    e.add_argument("--data-dir", help=data_help + "; default: the one the run was trained with")
    e.add_argument(
        "--dataset",
        metavar="{mnist,omniglot,PATH}",
        help="evaluate on this data instead of the run's own (its recorded dataset_path, or the built-in "
        "set); it must have the content hash recorded in config.json (dataset_sha256), e.g. the same "
        "file moved elsewhere",
    )
    e.add_argument(
        "--ignore-dataset-hash",
        action="store_true",
        help="evaluate even if the data is not the data the run was trained on (another content hash, "
        "or another built-in set); its images must still have the model's number of pixels",
    )
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument(
        "--per-example",
        metavar="FILE",
        help="also write each test image's log p-hat(x) = L_k, IWAE-64 and ELBO, in test-set order, to FILE: "
        ".csv (header index,log_px,iwae64,elbo) or .npy (a structured array with those fields); index is "
        "the image's index in the test set (the subset's with --n-test); missing directories are made",
    )
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --per-example FILE (--method ais: ais.json and ais.safetensors in --out)",
    )
    e.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    e.add_argument(
        "--method",
        choices=("iwae", "ais"),
        default="iwae",
        help="iwae: L_k and the metrics above (default); ais: log p(x) by annealed importance sampling with "
        "HMC transitions, beside L_k on the same images (read from RUN_DIR/evaluation.safetensors where it "
        "holds them, else computed with --k), written to ais.json and ais.safetensors in --out",
    )
    e.add_argument(
        "--ais-steps",
        type=_positive_int,
        help=f"--method ais: annealing steps T (default: {AIS_DEFAULTS['steps']})",
    )
    e.add_argument(
        "--chains",
        type=_positive_int,
        help=f"--method ais: AIS chains per image (default: {AIS_DEFAULTS['chains']})",
    )
    e.add_argument(
        "--hmc-leapfrog",
        type=_positive_int,
        help=f"--method ais: leapfrog steps per HMC transition (default: {AIS_DEFAULTS['leapfrog']})",
    )
    e.add_argument(
        "--ais-init",
        choices=("q", "prior"),
        help="--method ais: the annealing path starts from the encoder's q(h|x) or the prior p(h) (default: q)",
    )
    e.add_argument(
        "--out", help="--method ais: directory for ais.json and ais.safetensors (default: RUN_DIR)"
    )
    e.add_argument(
        "--flush-denormal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flush denormal floats to zero on the CPU (default: on; several times faster matmuls on some "
        "Intel CPUs, results unchanged)",
    )
    e.set_defaults(func=_evaluate)

    s = sub.add_parser(
        "sample",
        help="draw images from the model's prior and save them as a grid",
        description="Draw images from p(x) by ancestral sampling and save a PNG grid of their pixel probabilities.",
    )
    s.add_argument(
        "run_dir", metavar="RUN_DIR", type=_existing_run, help="a directory written by `iwae train`"
    )
    s.add_argument("--out", required=True, help="PNG file to write (missing directories are made)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.add_argument("--n", type=_positive_int, default=100, help="number of images (default: 100)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument(
        "--binary", action="store_true", help="show Bernoulli samples instead of probabilities"
    )
    s.set_defaults(func=_sample)
    r = sub.add_parser(
        "reproduce",
        help="run a published experiment's grid of runs (resumable), in parallel",
        description="Train and evaluate every run of a published experiment in OUT/runs/. Running it again skips "
        "finished runs and resumes interrupted ones. table1: Burda et al. Table 1 (24 runs); two-stage: Burda et al.'s "
        "two-stage training (4 runs); variants: Rainforth et al.'s IWAE variants (8 methods x seeds); dreg: IWAE with "
        "the standard and the DReG encoder gradient (8 runs). "
        "Then `iwae report OUT` writes the tables against the paper.",
    )
    r.add_argument(
        "experiment", choices=("table1", "two-stage", "variants", "dreg"), help="the experiment"
    )
    r.add_argument(
        "--out",
        required=True,
        help="experiment directory, made if missing (run again on it: finished runs "
        "are kept, interrupted ones resumed)",
    )
    r.add_argument(
        "--stages",
        type=_stages,
        default=4,
        help="stages of the 3^i schedule per run (default: 4 = 40 passes; the paper: 8)",
    )
    r.add_argument(
        "--seeds", type=_positive_int, help="seeds per configuration (default: 1; variants: 2)"
    )
    r.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="runs in parallel (local backend; default: 1)",
    )
    r.add_argument(
        "--threads",
        type=_positive_int,
        help="torch threads per run (default: cores / workers; lower it when other work shares the machine)",
    )
    r.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local worker processes, or Ray tasks on the cluster ray.init() connects to (default: local)",
    )
    r.add_argument(
        "--only",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="run only the runs whose label matches, e.g. --only dataset=mnist --only layers=1 (repeatable: "
        "different keys must all match; a key given again matches any of its values, e.g. "
        "--only method=VAE --only method=IWAE)",
    )
    r.add_argument(
        "--n-test",
        type=_positive_int,
        help="evaluate on a seeded random subset of N test images "
        "(the same for every run of a dataset; default: all, as tables beside the paper's need)",
    )
    r.add_argument(
        "--reuse",
        action="append",
        metavar="DIR",
        default=[],
        help="another experiment directory whose finished runs are copied in, not trained again, where "
        "a run here has the identical training configuration (e.g. two-stage's first stages from a table1 "
        "at the same --stages); repeatable",
    )
    r.add_argument(
        "--lockstep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train compatible runs (same data, architecture, samples per example and schedule: VAE and "
        "IWAE of one k, seeds) side by side in one process, each still writing its own run directory "
        "(default: on; on the CPU only where a step has under 256 rows, e.g. k <= 5 at batch 20)",
    )
    r.add_argument(
        "--group-size",
        type=_positive_int,
        default=8,
        help="most runs in one lockstep group (default: 8)",
    )
    r.add_argument("--data-dir", help=data_help)
    r.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    r.add_argument(
        "--flush-denormal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flush denormal floats to zero on the CPU (default: on; several times faster matmuls on some "
        "Intel CPUs, results unchanged)",
    )
    r.add_argument("--cuda-graphs", choices=CUDA_GRAPHS, default="auto", help=cuda_graphs_help)
    r.add_argument(
        "--time-limit",
        type=_positive_float,
        metavar="MINUTES",
        help=TIME_LIMIT_HELP
        + "; runs not started by then are not started, and a run whose training "
        "finished in time is still evaluated",
    )
    r.set_defaults(func=_reproduce)

    p = sub.add_parser(
        "report",
        help="write REPORT.md: our numbers beside the papers', with figures",
        description="Write DIR/REPORT.md and DIR/figures/ from the experiment directories in DIR "
        "(made by `iwae reproduce`).",
    )
    p.add_argument("dir", metavar="DIR", help="an experiment directory, or a directory of them")
    p.set_defaults(func=_report)

    y = sub.add_parser(
        "toy",
        help="Theorem 1 on a toy: E[log mean of k draws] against log E[X], exactly",
        description="X uniform on {a, b}: E[log((X_1+...+X_k)/k)] against log E[X] for k = 1..K, "
        "computed exactly by enumerating the binomial; writes OUT/toy.json and OUT/toy.png.",
    )
    y.add_argument("--a", type=float, default=1.0, help="first value of X (default: 1)")
    y.add_argument("--b", type=float, default=10.0, help="second value of X (default: 10)")
    y.add_argument("--k-max", type=_positive_int, default=200, help="largest k (default: 200)")
    y.add_argument(
        "--out",
        default=".",
        help="directory for toy.json and toy.png, made if missing (default: .)",
    )
    y.add_argument("--overwrite", action="store_true", help="replace toy.json and toy.png in --out")
    y.set_defaults(func=_toy)

    n = sub.add_parser(
        "snr",
        help="gradient signal-to-noise ratio of the encoder and decoder against K (Rainforth et al.)",
        description="For a fixed model and batch, estimate per parameter SNR = |E[grad]| / std[grad] of the "
        "IWAE_K objective's gradient over --reps fresh draws of the samples, average it over the encoder's and the "
        "decoder's parameters, and write OUT/snr.json and OUT/snr.png (SNR against K, log-log). With several "
        "estimators snr.json is a list of one object per estimator.",
    )
    n.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        nargs="?",
        type=_existing_run,
        help="a directory written by `iwae train`",
    )
    n.add_argument(
        "--latent",
        type=_latent,
        metavar="SIZES",
        help="instead, a freshly initialized model of this architecture (with --hidden, as in iwae train)",
    )
    n.add_argument(
        "--hidden",
        type=_hidden,
        metavar="SIZES",
        help="the hidden layers of --latent's model, e.g. 200x200",
    )
    n.add_argument(
        "--preset",
        choices=("burda1", "burda2"),
        help="instead, a freshly initialized Burda et al. 1- or 2-layer model (seeded by --seed) on MNIST",
    )
    n.add_argument(
        "--k",
        "-k",
        type=_k_list,
        default=[1, 5, 10, 50, 100, 500],
        help="comma-separated K values (default: 1,5,10,50,100,500)",
    )
    n.add_argument(
        "--estimator",
        type=_estimator_list,
        default=["reparam"],
        help="comma-separated estimators among reparam,stl,dreg (default: reparam)",
    )
    n.add_argument(
        "--reps", type=_positive_int, default=1000, help="gradient estimates per K (default: 1000)"
    )
    n.add_argument(
        "--batch-size",
        type=_positive_int,
        default=20,
        help="the fixed batch: the first N training images (default: 20)",
    )
    n.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the batch's binarization, the preset's weights and the samples (default: 0)",
    )
    n.add_argument(
        "--data-dir", help=data_help + "; default for RUN_DIR: the one the run was trained with"
    )
    n.add_argument(
        "--dataset",
        metavar="{mnist,omniglot,PATH}",
        help=f"the data of the fixed batch: {dataset_help} (default: mnist for --preset; for RUN_DIR the "
        "run's own data, and another must have the content hash recorded in its config.json)",
    )
    n.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    n.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    n.add_argument(
        "--out", required=True, help="directory to write snr.json and snr.png into, made if missing"
    )
    n.add_argument("--overwrite", action="store_true", help="replace snr.json and snr.png in --out")
    n.add_argument(
        "--flush-denormal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flush denormal floats to zero on the CPU (default: on; several times faster matmuls on some "
        "Intel CPUs, results unchanged)",
    )
    n.set_defaults(func=_snr)

    b = sub.add_parser(
        "bdmc",
        help="bidirectional Monte Carlo: AIS lower and upper bounds on log p(x) of images simulated from the model",
        description="Simulate N images from the model with their exact latents (h ~ p(h), x ~ p(x|h)); for each "
        "number of annealing steps T, forward AIS from q(h|x) (or the prior) gives a stochastic lower bound on "
        "log p(x) and reverse AIS from the exact latents a stochastic upper bound (Grosse et al. 2015, 2016). "
        "Writes OUT/bdmc.json (the mean bounds and their gap per T), OUT/bdmc.safetensors (per image) and "
        "OUT/bdmc.png (the two bounds against T).",
    )
    b.add_argument(
        "run_dir", metavar="RUN_DIR", type=_existing_run, help="a directory written by `iwae train`"
    )
    b.add_argument(
        "--n",
        type=_positive_int,
        default=100,
        help="images simulated from the model (default: 100)",
    )
    b.add_argument(
        "--ais-steps",
        type=_k_list,
        default=[10, 100, 1000],
        help="comma-separated numbers of annealing steps T (default: 10,100,1000)",
    )
    b.add_argument(
        "--chains",
        type=_positive_int,
        default=4,
        help="AIS chains per image and direction (default: 4)",
    )
    b.add_argument(
        "--hmc-leapfrog",
        type=_positive_int,
        default=AIS_DEFAULTS["leapfrog"],
        help=f"leapfrog steps per HMC transition (default: {AIS_DEFAULTS['leapfrog']})",
    )
    b.add_argument(
        "--ais-init",
        choices=("q", "prior"),
        default="q",
        help="forward AIS starts from (and reverse AIS ends at) q(h|x) or the prior p(h) (default: q)",
    )
    b.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the simulated images and of the chains (default: 0)",
    )
    b.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    b.add_argument(
        "--out",
        help="directory for bdmc.json, bdmc.safetensors and bdmc.png (default: RUN_DIR; missing "
        "directories are made)",
    )
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace bdmc.json, bdmc.safetensors and bdmc.png in --out",
    )
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    b.add_argument(
        "--flush-denormal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flush denormal floats to zero on the CPU (default: on)",
    )
    b.set_defaults(func=_bdmc)
    return parser


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


def parse_only(items: list[str]) -> dict[str, str | list[str]]:
    """``--only`` filters as ``iwae.experiments.reproduce`` takes them: KEY -> VALUE, or KEY ->
    [VALUE, ...] where a key is given again (a run matches any of those values)."""
    from iwae.experiments import only_values

    only: dict[str, str | list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise IwaeError(f"--only takes KEY=VALUE, got {item!r}")
        if key not in only:
            only[key] = value
        elif value not in only_values(only[key]):
            only[key] = [*only_values(only[key]), value]
    return only


def _reproduce(args) -> int:
    from iwae.experiments import reproduce

    only = parse_only(args.only)
    results = reproduce(
        args.experiment,
        args.out,
        stages=args.stages,
        seeds=args.seeds,
        workers=args.workers,
        backend=args.backend,
        data_dir=args.data_dir,
        progress=not args.quiet,
        n_test=args.n_test,
        only=only or None,
        threads=args.threads,
        reuse=args.reuse or None,
        flush_denormal=args.flush_denormal,
        lockstep=args.lockstep,
        group_size=args.group_size,
        cuda_graphs=args.cuda_graphs,
        time_limit=args.time_limit,
    )
    done = sum(r["status"] == "done" for r in results)
    stopped = sum(r["status"] == "stopped" for r in results)
    print(
        f"{args.experiment}: {done} runs done, {len(results) - done - stopped} already finished"
        + (
            f", {stopped} stopped at the time limit (run the same command again to continue them)"
            if stopped
            else ""
        )
        + f" -> {args.out}; next: iwae report {args.out}"
    )
    return EXIT_TIME_LIMIT if stopped else 0


def _report(args) -> int:
    from iwae.report import write_report

    print(f"wrote {write_report(args.dir)}")
    return 0


def _toy(args) -> int:
    from iwae.experiments import toy
    from iwae.report import plot_toy
    from iwae.rundir import check_output_dir, write_json

    out = check_output_dir(args.out, ("toy.json", "toy.png"), args.overwrite)
    result = toy(args.a, args.b, args.k_max)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "toy.json", result)
    plot_toy(result, out / "toy.png")
    bias = result["bias"]
    monotone = all(b2 <= b1 for b1, b2 in zip(bias, bias[1:]))
    print(
        f"log E[X] = {result['log_expected']:.4f}; bias at k=1: {bias[0]:.4f}, at k={args.k_max}: {bias[-1]:.6f}; "
        f"{'monotonically shrinking' if monotone else 'NOT monotone'} -> {out / 'toy.png'}"
    )
    return 0


def _version() -> str:
    from iwae import __version__

    return __version__


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
    import torch

    threads = torch.get_num_threads()
    try:
        return _train_run(args)
    finally:  # main() may be called in-process (tests, notebooks): leave torch as it was
        torch.set_num_threads(threads)


def _train_run(args) -> int:
    from iwae.rundir import checkpoint_exists
    from iwae.train import TrainConfig, load_config, read_config_file, resume, train

    given = {key: value for key, value in vars(args).items() if key not in _RUNTIME_OPTIONS}
    progress, device = not getattr(args, "quiet", False), getattr(args, "device", "auto")
    cuda_graphs = getattr(args, "cuda_graphs", "auto")
    limit = getattr(args, "time_limit", None)
    stop_at = None if limit is None else time.time() + 60 * limit
    if getattr(args, "resume", None):
        data_dir = given.pop("data_dir", None)
        if given or hasattr(args, "config") or hasattr(args, "out"):
            raise IwaeError(
                "--resume takes the run's own configuration: give only --resume RUN_DIR [--data-dir] "
                "[--device] [--threads] [--cuda-graphs] [--time-limit] [--quiet]"
            )
        config = load_config(args.resume)
        _set_threads(getattr(args, "threads", "auto"), config)
        if not checkpoint_exists(args.resume):
            print(
                f"note: {args.resume} has no checkpoint (stopped before its first): the run starts again from its "
                f"config.json",
                file=sys.stderr,
            )
        summary = resume(
            args.resume,
            progress=progress,
            device=device,
            cuda_graphs=cuda_graphs,
            data_dir=data_dir,
            stop_at=stop_at,
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


def _out_dir(args, names: tuple[str, ...]) -> Path:
    """--out (created when needed), else RUN_DIR; checked before any work is done: result
    files ``names`` already there are replaced only with --overwrite."""
    from iwae.rundir import check_output_dir

    return check_output_dir(Path(args.out) if args.out else args.run_dir, names, args.overwrite)


def _evaluate(args) -> int:
    ais_flags = {
        "--ais-steps": args.ais_steps,
        "--chains": args.chains,
        "--hmc-leapfrog": args.hmc_leapfrog,
        "--ais-init": args.ais_init,
        "--out": args.out,
    }
    if args.method == "ais":
        if args.per_example:
            raise IwaeError(
                "--per-example is for --method iwae (AIS writes its per-image values to ais.safetensors)"
            )
        return _evaluate_ais(args)
    given = [flag for flag, value in ais_flags.items() if value is not None]
    if given:
        raise IwaeError(
            f"{', '.join(given)} given without --method ais: these options are for AIS only"
        )
    return _evaluate_iwae(args)


def _evaluate_ais(args) -> int:
    import torch

    from iwae import data as iwae_data
    from iwae.evaluate import evaluate_ais
    from iwae.rundir import AIS_FILE, AIS_IMAGES_FILE, read_evaluation_log_px, write_ais
    from iwae.train import load_run, pick_device, run_dataset

    out = _out_dir(args, (AIS_FILE, AIS_IMAGES_FILE))
    device = pick_device(args.device)
    config, model = load_run(args.run_dir, device)
    dataset = run_dataset(
        config, args.dataset, args.data_dir, check_hash=not args.ignore_dataset_hash
    )
    x = torch.from_numpy(iwae_data.binarized_test(dataset, args.n_test)).to(device)
    test_index = iwae_data.test_subset_indices(dataset.test.shape[0], args.n_test)
    stored = read_evaluation_log_px(args.run_dir, test_index)
    reference, k = (stored[0].to(device), stored[1]) if stored is not None else (None, args.k)
    result, per_image = evaluate_ais(
        model,
        x,
        steps=args.ais_steps or AIS_DEFAULTS["steps"],
        chains=args.chains or AIS_DEFAULTS["chains"],
        leapfrog_steps=args.hmc_leapfrog or AIS_DEFAULTS["leapfrog"],
        init=args.ais_init or "q",
        seed=args.seed,
        reference=reference,
        k=k,
        progress=not args.quiet,
    )
    result["iwae_source"] = "evaluation.safetensors" if stored is not None else "computed"
    result.update(iwae_data.test_subset_record(dataset.test.shape[0], args.n_test))
    result.update(_machine())
    out.mkdir(parents=True, exist_ok=True)
    write_ais(out, result, per_image, test_index)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        acc = "n/a" if result["ais_acceptance"] is None else f"{result['ais_acceptance']:.2f}"
        print(
            f"log p(x) by AIS (T={result['ais_steps']}, {result['chains']} chains, {result['hmc_leapfrog']} leapfrog "
            f"steps, from {result['ais_init']}; {result['n_test']} images): {result['log_px_ais']:.2f} "
            f"+- {result['log_px_ais_stderr']:.2f} nats, HMC acceptance {acc}"
        )
        print(
            f"L_{k} on the same images {result['log_px_iwae']:.2f}; AIS - L_{k} = {result['ais_gap']:+.3f} "
            f"+- {result['ais_gap_stderr']:.3f} nats ({result['ais_seconds']:.0f} s) -> {out / AIS_FILE}"
        )
    return 0


def _machine() -> dict:
    """Where a timing was measured: CPU model, torch version and threads."""
    import torch

    from iwae.experiments import _cpu_name

    return {
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _bdmc(args) -> int:
    from iwae.ais import bdmc
    from iwae.report import save_bdmc_plot
    from iwae.rundir import BDMC_FIGURE, BDMC_FILE, BDMC_IMAGES_FILE, write_bdmc
    from iwae.train import load_run, pick_device

    out = _out_dir(args, (BDMC_FILE, BDMC_IMAGES_FILE, BDMC_FIGURE))
    device = pick_device(args.device)
    _, model = load_run(args.run_dir, device)
    result = bdmc(
        model,
        args.n,
        sorted(args.ais_steps),
        args.chains,
        args.hmc_leapfrog,
        init=args.ais_init,
        seed=args.seed,
        progress=not args.quiet,
    )
    per_image = result.pop("per_image")
    result.update(
        n=args.n,
        chains=args.chains,
        hmc_leapfrog=args.hmc_leapfrog,
        ais_init=args.ais_init,
        seed=args.seed,
        source=str(args.run_dir),
        **_machine(),
    )
    out.mkdir(parents=True, exist_ok=True)
    write_bdmc(out, result, {k: v.float() for k, v in per_image.items()})
    save_bdmc_plot(result, out / BDMC_FIGURE)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for t, lo, up, gap in zip(result["steps"], result["lower"], result["upper"], result["gap"]):
            print(
                f"T={t}: {lo:.3f} <= log p(x) <= {up:.3f}  (gap {gap:.3f} nats, mean over {args.n} simulated images)"
            )
        print(f"wrote {out / BDMC_FILE} and {out / BDMC_FIGURE} ({sum(result['seconds']):.0f} s)")
    return 0


def _evaluate_iwae(args) -> int:
    import torch

    from iwae import data as iwae_data
    from iwae.evaluate import evaluate_images
    from iwae.rundir import (
        PER_EXAMPLE_FORMATS,
        SUMMARY_FILE,
        check_output_file,
        write_evaluation,
        write_per_example,
    )
    from iwae.train import load_run, pick_device, run_dataset

    per_example = None
    if args.per_example:  # checked before any work
        per_example = check_output_file(
            args.per_example, args.overwrite, "--per-example", PER_EXAMPLE_FORMATS
        )
    device = pick_device(args.device)
    config, model = load_run(args.run_dir, device)
    dataset = run_dataset(
        config, args.dataset, args.data_dir, check_hash=not args.ignore_dataset_hash
    )
    x = torch.from_numpy(iwae_data.binarized_test(dataset, args.n_test)).to(device)
    result, per_image = evaluate_images(model, x, k=args.k, seed=args.seed, progress=not args.quiet)
    result.update(iwae_data.test_subset_record(dataset.test.shape[0], args.n_test))
    test_index = iwae_data.test_subset_indices(dataset.test.shape[0], args.n_test)
    write_evaluation(args.run_dir, result, per_image, test_index)
    if per_example is not None:
        write_per_example(per_example, per_image, test_index)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        units = "+".join(str(a) for a in result["active_units"])
        print(
            f"test NLL (L_{result['k']}, {result['n_test']} images): {result['nll']:.2f} +- {result['nll_stderr']:.2f} nats"
        )
        print(
            f"IWAE-64 {result['iwae64']:.2f}   log p-hat(x) {result['log_px']:.2f}   "
            f"-KL(Q||P) {result['neg_kl_q_p']:.2f}   ELBO {result['elbo']:.2f}   active units {units}"
        )
        if per_example is not None:
            print(f"per-image values ({result['n_test']} images) -> {per_example}")
    if not (args.run_dir / SUMMARY_FILE).exists():
        print(
            f"note: {args.run_dir} has no {SUMMARY_FILE}: its training did not finish",
            file=sys.stderr,
        )
    return 0


def _sample(args) -> int:
    import torch

    from iwae.report import save_image_grid
    from iwae.rundir import check_output_file, make_parents
    from iwae.train import load_run

    out = check_output_file(args.out, args.overwrite, "--out", (".png",))
    config, model = load_run(args.run_dir)
    generator = torch.Generator().manual_seed(args.seed)
    images = model.sample_images(args.n, generator)
    if args.binary:
        images = torch.bernoulli(images, generator=generator)
    save_image_grid(images.numpy(), make_parents(out), shape=config.image_shape)
    print(f"wrote {args.n} samples to {out}")
    return 0


def _snr(args) -> int:
    import time

    import torch

    from iwae import data as iwae_data
    from iwae.evaluate import gradient_snr_curve
    from iwae.model import VAE, ModelConfig
    from iwae.progress import progress_bar
    from iwae.report import save_snr_plot
    from iwae.rundir import check_output_dir, write_json
    from iwae.train import load_run, pick_device, run_dataset

    fresh = args.latent is not None or args.hidden is not None
    if (args.run_dir is not None) + (args.preset is not None) + fresh != 1:
        raise IwaeError("give one of RUN_DIR, --preset, or --latent with --hidden")
    if fresh and (
        args.latent is None or args.hidden is None or len(args.latent) != len(args.hidden)
    ):
        raise IwaeError(
            "--latent and --hidden go together, one hidden-layer list per stochastic layer "
            "(e.g. --latent 100,50 --hidden 200x200,100x100)"
        )
    if args.reps < 2:
        raise IwaeError(f"--reps must be >= 2 to estimate a standard deviation, got {args.reps}")
    out = check_output_dir(args.out, ("snr.json", "snr.png"), args.overwrite)
    device = pick_device(args.device)
    if args.run_dir is not None:
        config, model = load_run(args.run_dir, device)
        dataset = run_dataset(config, args.dataset, args.data_dir)
        source = str(args.run_dir)
    else:
        dataset = iwae_data.load_dataset(args.dataset or "mnist", args.data_dir)
        torch.manual_seed(args.seed)
        pixel_mean = torch.from_numpy(dataset.train.mean(0))
        if fresh:
            architecture = ModelConfig(x_dim=dataset.x_dim, latent=args.latent, hidden=args.hidden)
            source = f"latent {args.latent} hidden {args.hidden}, seed {args.seed}"
        else:
            architecture = ModelConfig.preset(int(args.preset[-1]), x_dim=dataset.x_dim)
            source = f"preset {args.preset}, seed {args.seed}"
        model = VAE(architecture, pixel_mean=pixel_mean).to(device)
    x = torch.from_numpy(
        iwae_data.binarize_fixed(dataset.train[: args.batch_size], seed=args.seed)
    ).to(device)

    curves = []
    total = args.reps * len(args.k) * len(args.estimator)
    with progress_bar(total, "SNR", "grad", enabled=not args.quiet) as bar:
        for est in args.estimator:
            started = time.perf_counter()
            c = gradient_snr_curve(model, x, args.k, est, reps=args.reps, seed=args.seed, bar=bar)
            c.update(
                reps=args.reps,
                batch_size=int(x.shape[0]),
                source=source,
                seconds=time.perf_counter() - started,
            )
            curves.append(c)
    seconds = sum(c["seconds"] for c in curves)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "snr.json", curves[0] if len(curves) == 1 else curves)
    save_snr_plot(curves, out / "snr.png")
    for c in curves:
        enc, dec = (
            f"{v:+.2f}" if v is not None else "n/a"
            for v in (c["encoder_slope"], c["decoder_slope"])
        )
        print(f"{c['estimator']}: log-log slope of SNR against K: encoder {enc}, decoder {dec}")
    print(f"wrote {out / 'snr.json'} and {out / 'snr.png'} ({seconds:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("train", "evaluate", "snr", "reproduce", "bdmc"):
        from iwae.train import flush_denormals

        flush_denormals(getattr(args, "flush_denormal", True))
    try:
        return args.func(args)
    except IwaeError as e:
        print(f"iwae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TimeLimitReached as e:
        print(f"iwae {args.command}: {e}", file=sys.stderr)
        return EXIT_TIME_LIMIT
    except KeyboardInterrupt:
        print("iwae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
