"""The papers' experiments: ``iwae reproduce`` (a published grid of runs, resumable),
``iwae report`` (REPORT.md beside the papers' numbers), ``iwae toy`` (Burda et al.'s Theorem 1
on a toy, exactly) and ``iwae snr`` (Rainforth et al.'s gradient signal-to-noise ratio against
K)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from iwae import data as iwae_data
from iwae import experiments as iwae_experiments
from iwae.cli.options import (
    DATASET_HELP,
    EXIT_RUNS_FAILED,
    EXIT_TIME_LIMIT,
    _estimator_list,
    _hidden,
    _k_list,
    _latent,
    _non_negative_int,
    _positive_int,
    _stages,
    add_cuda_graphs,
    add_data_dir,
    add_dataset,
    add_device,
    add_flush_denormal,
    add_overwrite,
    add_precision,
    add_quiet,
    add_run_dir,
    add_seed,
    add_time_limit,
)
from iwae.errors import IwaeError
from iwae.evaluate import gradient_snr_curve
from iwae.experiments import EXPERIMENTS, experiments_help, only_values, toy
from iwae.model import VAE, ModelConfig
from iwae.progress import progress_bar
from iwae.report import plot_toy, save_snr_plot, write_report
from iwae.rundir import check_output_dir, write_json
from iwae.train import load_run, pick_device, run_dataset


def _default_seeds() -> str:
    """``1; variants: 2``: the registry's default seeds, the common one first."""
    common = min((e.seeds for e in EXPERIMENTS.values()), default=1)
    others = [f"{e.name}: {e.seeds}" for e in EXPERIMENTS.values() if e.seeds != common]
    return "; ".join([str(common), *others])


def add_reproduce_parser(sub) -> None:
    """``iwae reproduce`` on the subcommands ``sub``."""
    r = sub.add_parser(
        "reproduce",
        help="run a published experiment's grid of runs (resumable), in parallel",
        description="Train and evaluate every run of a published experiment in OUT/runs/. Running "
        f"it again skips finished runs and resumes interrupted ones. {experiments_help()} Then "
        "`iwae report OUT` writes the tables against the paper.",
    )
    r.add_argument("experiment", choices=tuple(EXPERIMENTS), help="the experiment")
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
        "--seeds",
        type=_positive_int,
        help=f"seeds per configuration (default: {_default_seeds()})",
    )
    _add_workers(r)
    _add_run_selection(r)
    _add_lockstep(r)
    add_data_dir(r)
    add_quiet(r)
    add_flush_denormal(r)
    add_cuda_graphs(r)
    add_precision(r)
    add_time_limit(
        r,
        "the same command",
        "; runs not started by then are not started, and a run whose training finished in time is "
        "still evaluated",
    )
    r.set_defaults(func=_reproduce)


def _add_workers(r: argparse.ArgumentParser) -> None:
    """Where the runs run: processes or Ray tasks, and their threads."""
    r.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="runs in parallel (local backend; default: 1)",
    )
    r.add_argument(
        "--threads",
        type=_positive_int,
        help="torch threads per run (default: cores / workers; lower it when other work shares the "
        "machine)",
    )
    r.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local worker processes, or Ray tasks on the cluster ray.init() connects to "
        "(default: local)",
    )
    r.add_argument(
        "--max-retries",
        type=_non_negative_int,
        default=2,
        help="times a run whose process dies (killed, crashed) is started again from its "
        "checkpoint before it counts as failed (default: 2)",
    )


def _add_run_selection(r: argparse.ArgumentParser) -> None:
    """Which runs to train, on which test images, and which to copy from elsewhere."""
    r.add_argument(
        "--only",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="run only the runs whose label matches, e.g. --only dataset=mnist --only layers=1 "
        "(repeatable: different keys must all match; a key given again matches any of its "
        "values, e.g. --only method=VAE --only method=IWAE)",
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
        help="another experiment directory whose finished runs are copied in, not trained again, "
        "where a run here has the identical training configuration (e.g. two-stage's first "
        "stages from a table1 at the same --stages); repeatable",
    )


def _add_lockstep(r: argparse.ArgumentParser) -> None:
    """Compatible runs trained side by side in one process."""
    r.add_argument(
        "--lockstep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train compatible runs (same data, architecture, samples per example and schedule: "
        "VAE and IWAE of one k, seeds) side by side in one process, each still writing its own run "
        "directory (default: on; on the CPU only where a step has under 256 rows, e.g. k <= 5 at "
        "batch 20)",
    )
    r.add_argument(
        "--group-size",
        type=_positive_int,
        default=8,
        help="most runs in one lockstep group (default: 8)",
    )


def add_report_parser(sub) -> None:
    """``iwae report`` on the subcommands ``sub``."""
    p = sub.add_parser(
        "report",
        help="write REPORT.md: our numbers beside the papers', with figures",
        description="Write DIR/REPORT.md and DIR/figures/ from the experiment directories in DIR "
        "(made by `iwae reproduce`).",
    )
    p.add_argument("dir", metavar="DIR", help="an experiment directory, or a directory of them")
    p.set_defaults(func=_report)


def add_toy_parser(sub) -> None:
    """``iwae toy`` on the subcommands ``sub``."""
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
    add_overwrite(y, "toy.json and toy.png in --out")
    y.set_defaults(func=_toy)


def add_snr_parser(sub) -> None:
    """``iwae snr`` on the subcommands ``sub``."""
    n = sub.add_parser(
        "snr",
        help="gradient signal-to-noise ratio of the encoder and decoder against K (Rainforth et "
        "al.)",
        description="For a fixed model and batch, estimate per parameter SNR = |E[grad]| / "
        "std[grad] of the IWAE_K objective's gradient over --reps fresh draws of the samples, "
        "average it over the encoder's and the decoder's parameters, and write OUT/snr.json and "
        "OUT/snr.png (SNR against K, log-log). With several estimators snr.json is a list of one "
        "object per estimator.",
    )
    _add_snr_model(n)
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
    add_seed(n, "seed of the batch's binarization, the preset's weights and the samples")
    add_data_dir(n, "; default for RUN_DIR: the one the run was trained with")
    add_dataset(
        n,
        f"the data of the fixed batch: {DATASET_HELP} (default: mnist for --preset; for RUN_DIR "
        "the run's own data, and another must have the content hash recorded in its config.json)",
    )
    add_device(n)
    add_quiet(n)
    n.add_argument(
        "--out", required=True, help="directory to write snr.json and snr.png into, made if missing"
    )
    add_overwrite(n, "snr.json and snr.png in --out")
    add_flush_denormal(n)
    n.set_defaults(func=_snr)


def _add_snr_model(n: argparse.ArgumentParser) -> None:
    """The model whose gradients are measured: a trained run's, or a fresh one."""
    add_run_dir(n, nargs="?")
    n.add_argument(
        "--latent",
        type=_latent,
        metavar="SIZES",
        help="instead, a freshly initialized model of this architecture (with --hidden, as in "
        "iwae train)",
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
        help="instead, a freshly initialized Burda et al. 1- or 2-layer model (seeded by --seed) "
        "on MNIST",
    )


def parse_only(items: list[str]) -> dict[str, str | list[str]]:
    """``--only`` filters as ``iwae.experiments.reproduce`` takes them: KEY -> VALUE, or KEY ->
    [VALUE, ...] where a key is given again (a run matches any of those values)."""
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
    only = parse_only(args.only)
    results = iwae_experiments.reproduce(
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
        max_retries=args.max_retries,
        overrides=None if args.precision is None else {"precision": args.precision},
    )
    done = sum(r["status"] == "done" for r in results)
    stopped = sum(r["status"] == "stopped" for r in results)
    failed = [r for r in results if r["status"].startswith("failed")]
    for r in failed:
        print(f"iwae reproduce: {r['name']}: {r['status']}", file=sys.stderr)
    print(
        f"{args.experiment}: {done} runs done, "
        f"{len(results) - done - stopped - len(failed)} already finished"
        + (
            f", {stopped} stopped at the time limit (run the same command again to continue them)"
            if stopped
            else ""
        )
        + (f", {len(failed)} failed (see {args.out}/runner.json)" if failed else "")
        + f" -> {args.out}; next: iwae report {args.out}"
    )
    return EXIT_RUNS_FAILED if failed else EXIT_TIME_LIMIT if stopped else 0


def _report(args) -> int:
    """DIR/REPORT.md and DIR/figures/ from the experiment directories in DIR."""
    print(f"wrote {write_report(args.dir)}")
    return 0


def _toy(args) -> int:
    """Theorem 1's bias E[log mean of k draws] - log E[X], exactly -> toy.json and toy.png."""
    out = check_output_dir(args.out, ("toy.json", "toy.png"), args.overwrite)
    result = toy(args.a, args.b, args.k_max)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "toy.json", result)
    plot_toy(result, out / "toy.png")
    bias = result["bias"]
    monotone = all(b2 <= b1 for b1, b2 in zip(bias, bias[1:]))
    print(
        f"log E[X] = {result['log_expected']:.4f}; bias at k=1: {bias[0]:.4f}, "
        f"at k={args.k_max}: {bias[-1]:.6f}; "
        f"{'monotonically shrinking' if monotone else 'NOT monotone'} -> {out / 'toy.png'}"
    )
    return 0


def _snr(args) -> int:
    """Gradient SNR against K for each --estimator -> snr.json and snr.png."""
    _check_snr_sources(args)
    out = check_output_dir(args.out, ("snr.json", "snr.png"), args.overwrite)
    device = pick_device(args.device)
    model, dataset, source = _snr_model(args, device)
    x = torch.from_numpy(
        iwae_data.binarize_fixed(dataset.train[: args.batch_size], seed=args.seed)
    ).to(device)
    curves = _snr_curves(args, model, x, source)
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


def _check_snr_sources(args) -> None:
    """One model source (RUN_DIR, --preset, or --latent with --hidden) and --reps >= 2."""
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


def _snr_model(args, device) -> tuple[VAE, iwae_data.Dataset, str]:
    """The model on ``device``, the dataset of its batch, and the source snr.json records: the
    run's, or a fresh model (weights seeded by --seed) of --preset or --latent/--hidden."""
    if args.run_dir is not None:
        config, model = load_run(args.run_dir, device)
        return model, run_dataset(config, args.dataset, args.data_dir), str(args.run_dir)
    dataset = iwae_data.load_dataset(args.dataset or "mnist", args.data_dir)
    torch.manual_seed(args.seed)
    pixel_mean = torch.from_numpy(dataset.train.mean(0))
    if args.preset is None:
        architecture = ModelConfig(x_dim=dataset.x_dim, latent=args.latent, hidden=args.hidden)
        source = f"latent {args.latent} hidden {args.hidden}, seed {args.seed}"
    else:
        architecture = ModelConfig.preset(int(args.preset[-1]), x_dim=dataset.x_dim)
        source = f"preset {args.preset}, seed {args.seed}"
    return VAE(architecture, pixel_mean=pixel_mean).to(device), dataset, source


def _snr_curves(args, model: VAE, x: torch.Tensor, source: str) -> list[dict]:
    """One SNR-against-K curve (:func:`iwae.evaluate.gradient_snr_curve`) per --estimator, on
    the batch ``x``, each with its settings and seconds."""
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
    return curves
