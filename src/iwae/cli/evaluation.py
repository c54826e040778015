"""The commands that use a trained run's model: ``iwae evaluate`` (test-set bounds, or log p(x)
by AIS), ``iwae bdmc`` (AIS bounds on simulated images) and ``iwae sample``."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from iwae import data as iwae_data
from iwae.ais import bdmc
from iwae.cli.options import (
    AIS_INITS,
    _k_list,
    _positive_int,
    add_data_dir,
    add_dataset,
    add_device,
    add_flush_denormal,
    add_json,
    add_overwrite,
    add_quiet,
    add_run_dir,
    add_seed,
)
from iwae.errors import IwaeError
from iwae.evaluate import evaluate_ais, evaluate_images
from iwae.report import save_bdmc_plot, save_image_grid
from iwae.rundir import (
    AIS_FILE,
    AIS_IMAGES_FILE,
    BDMC_FIGURE,
    BDMC_FILE,
    BDMC_IMAGES_FILE,
    PER_EXAMPLE_FORMATS,
    SUMMARY_FILE,
    check_output_dir,
    check_output_file,
    make_parents,
    read_evaluation_log_px,
    training_finished,
    write_ais,
    write_bdmc,
    write_evaluation,
    write_per_example,
)
from iwae.runlock import locked
from iwae.train import evaluation_dir, load_run, pick_device, run_dataset
from iwae.worker import _cpu_name

#: iwae evaluate --method ais: annealing steps, chains per image, leapfrog steps per HMC transition
AIS_DEFAULTS = {"steps": 1000, "chains": 16, "leapfrog": 10}


def add_evaluate_parser(sub) -> None:
    """``iwae evaluate`` on the subcommands ``sub``."""
    e = sub.add_parser(
        "evaluate",
        help="test NLL (L_5000), IWAE-64, log p-hat(x), -KL(Q||P), ELBO and active units",
        description="Evaluate a trained run on its test set: NLL = -mean L_k with its standard "
        "error, IWAE-64, log p-hat(x) = mean L_k, -KL(Q||P) = IWAE-64 - log p-hat(x), the ELBO and "
        "the active units per layer (and, for logistic-256, the NLL in bits per dimension). The "
        "test images are binarized once with a fixed seed for a Bernoulli decoder, used as they "
        "are for every other likelihood. The "
        "result is also written to RUN_DIR/evaluation.json, and the per-image values (L_k, "
        "IWAE-64, ELBO and each image's index in the test set) to RUN_DIR/evaluation.safetensors. "
        "A run whose training has not finished (no summary.json; say, a full schedule still "
        "training) is evaluated at its latest stage end: the weights saved there, after P "
        "passes, and the results go to RUN_DIR/stages/P/ (AIS's too, unless --out), never to "
        "RUN_DIR/evaluation.json, which marks a finished run (`iwae reproduce` skips it).",
    )
    add_run_dir(e)
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
        help="evaluate on a seeded random subset of N test images (the same subset for every "
        "run of a dataset; its seed is in evaluation.json; default: all)",
    )
    add_seed(e, "seed of the importance samples")
    add_data_dir(e, "; default: the one the run was trained with")
    add_dataset(
        e,
        "evaluate on this data instead of the run's own (its recorded dataset_path, or the "
        "built-in set); it must have the content hash recorded in config.json (dataset_sha256), "
        "e.g. the same file moved elsewhere",
    )
    e.add_argument(
        "--ignore-dataset-hash",
        action="store_true",
        help="evaluate even if the data is not the data the run was trained on (another content "
        "hash, or another built-in set); its images must still have the model's number of pixels",
    )
    add_device(e)
    add_json(e)
    e.add_argument(
        "--per-example",
        metavar="FILE",
        help="also write each test image's log p-hat(x) = L_k, IWAE-64 and ELBO, in test-set "
        "order, to FILE: .csv (header index,log_px,iwae64,elbo) or .npy (a structured array with "
        "those fields); index is the image's index in the test set (the subset's with --n-test); "
        "missing directories are made",
    )
    add_overwrite(
        e,
        "an existing --per-example FILE (--method ais: ais.json and ais.safetensors in --out)",
    )
    add_quiet(e)
    _add_ais_options(e)
    add_flush_denormal(e)
    e.set_defaults(func=_evaluate)


def _add_ais_options(e) -> None:
    """``iwae evaluate --method ais`` and the options only it takes."""
    e.add_argument(
        "--method",
        choices=("iwae", "ais"),
        default="iwae",
        help="iwae: L_k and the metrics above (default); ais: log p(x) by annealed importance "
        "sampling with HMC transitions, beside L_k on the same images (read from "
        "RUN_DIR/evaluation.safetensors where it holds them, else computed with --k), written to "
        "ais.json and ais.safetensors in --out",
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
        help="--method ais: leapfrog steps per HMC transition "
        f"(default: {AIS_DEFAULTS['leapfrog']})",
    )
    e.add_argument(
        "--ais-init",
        choices=AIS_INITS,
        help="--method ais: the annealing path starts from the encoder's q(h|x) or the prior p(h) "
        "(default: q)",
    )
    e.add_argument(
        "--out",
        help="--method ais: directory for ais.json and ais.safetensors (default: RUN_DIR, or "
        "RUN_DIR/stages/P for a run whose training has not finished)",
    )


def add_bdmc_parser(sub) -> None:
    """``iwae bdmc`` on the subcommands ``sub``."""
    b = sub.add_parser(
        "bdmc",
        help="bidirectional Monte Carlo: AIS lower and upper bounds on log p(x) of images "
        "simulated from the model",
        description="Simulate N images from the model with their exact latents (h ~ p(h), "
        "x ~ p(x|h)); for each number of annealing steps T, forward AIS from q(h|x) (or the prior) "
        "gives a stochastic lower bound on log p(x) and reverse AIS from the exact latents a "
        "stochastic upper bound (Grosse et al. 2015, 2016). Writes OUT/bdmc.json (the mean bounds "
        "and their gap per T), OUT/bdmc.safetensors (per image) and OUT/bdmc.png (the two bounds "
        "against T).",
    )
    add_run_dir(b)
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
        choices=AIS_INITS,
        default="q",
        help="forward AIS starts from (and reverse AIS ends at) q(h|x) or the prior p(h) "
        "(default: q)",
    )
    add_seed(b, "seed of the simulated images and of the chains")
    add_device(b)
    b.add_argument(
        "--out",
        help="directory for bdmc.json, bdmc.safetensors and bdmc.png (default: RUN_DIR; missing "
        "directories are made)",
    )
    add_overwrite(b, "bdmc.json, bdmc.safetensors and bdmc.png in --out")
    add_json(b)
    add_quiet(b)
    add_flush_denormal(b)
    b.set_defaults(func=_bdmc)


def add_sample_parser(sub) -> None:
    """``iwae sample`` on the subcommands ``sub``."""
    s = sub.add_parser(
        "sample",
        help="draw images from the model's prior and save them as a grid",
        description="Draw images from p(x) by ancestral sampling and save a PNG grid of their "
        "pixel probabilities.",
    )
    add_run_dir(s)
    s.add_argument("--out", required=True, help="PNG file to write (missing directories are made)")
    add_overwrite(s, "an existing --out file")
    s.add_argument("--n", type=_positive_int, default=100, help="number of images (default: 100)")
    add_seed(s)
    s.add_argument(
        "--binary",
        action="store_true",
        help="show Bernoulli samples instead of probabilities (a Bernoulli decoder's runs; "
        "other likelihoods show E[x | h], clipped to [0, 1])",
    )
    s.set_defaults(func=_sample)


def _evaluate(args) -> int:
    """iwae evaluate: --method iwae or ais, refusing the other method's options."""
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
                "--per-example is for --method iwae (AIS writes its per-image values to "
                "ais.safetensors)"
            )
        return _evaluate_ais(args)
    given = [flag for flag, value in ais_flags.items() if value is not None]
    if given:
        raise IwaeError(
            f"{', '.join(given)} given without --method ais: these options are for AIS only"
        )
    return _evaluate_iwae(args)


def _evaluate_iwae(args) -> int:
    """L_k, IWAE-64, ELBO and active units on the test set -> RUN_DIR/evaluation.json and
    evaluation.safetensors (and --per-example FILE), holding RUN_DIR's lock."""
    per_example = None
    if args.per_example:  # checked before any work
        per_example = check_output_file(
            args.per_example, args.overwrite, "--per-example", PER_EXAMPLE_FORMATS
        )
    with locked(args.run_dir):
        return _evaluate_iwae_locked(args, per_example)


def _evaluate_iwae_locked(args, per_example: Path | None) -> int:
    device = pick_device(args.device)
    out, passes = evaluation_dir(args.run_dir)
    config, model = load_run(args.run_dir, device)
    dataset = run_dataset(
        config, args.dataset, args.data_dir, check_hash=not args.ignore_dataset_hash
    )
    x = torch.from_numpy(iwae_data.test_images(dataset, args.n_test, config.binarizes)).to(device)
    result, per_image = evaluate_images(model, x, k=args.k, seed=args.seed, progress=not args.quiet)
    result.update(iwae_data.test_subset_record(dataset.test.shape[0], args.n_test))
    test_index = iwae_data.test_subset_indices(dataset.test.shape[0], args.n_test)
    if passes is not None:
        result["passes"] = passes
    out.mkdir(parents=True, exist_ok=True)
    write_evaluation(out, result, per_image, test_index)
    if per_example is not None:
        write_per_example(per_example, per_image, test_index)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        units = "+".join(str(a) for a in result["active_units"])
        print(
            f"test NLL (L_{result['k']}, {result['n_test']} images): {result['nll']:.2f} "
            f"+- {result['nll_stderr']:.2f} nats"
        )
        print(
            f"IWAE-64 {result['iwae64']:.2f}   log p-hat(x) {result['log_px']:.2f}   "
            f"-KL(Q||P) {result['neg_kl_q_p']:.2f}   ELBO {result['elbo']:.2f}   "
            f"active units {units}"
        )
        if "bits_per_dim" in result:
            print(_bits_line(result["bits_per_dim"], "L_" + str(result["k"]), x.shape[1]))
        if per_example is not None:
            print(f"per-image values ({result['n_test']} images) -> {per_example}")
    if passes is not None:
        _unfinished_note(args.run_dir, passes, out)
    return 0


def _unfinished_note(run_dir: Path, passes: int, out: Path) -> None:
    """Say that an unfinished run's weights of its latest stage end were evaluated, where
    the result went, and that the run's own evaluation waits for its training to finish."""
    print(
        f"note: {run_dir} has no {SUMMARY_FILE}: its training has not finished. Evaluated "
        f"the weights of its latest stage end, after {passes:,} pass{'es' * (passes != 1)} "
        f"-> {out}/ (the run's "
        "own evaluation.json waits for the end of its training)",
        file=sys.stderr,
    )


def _evaluate_ais(args) -> int:
    """log p(x) by AIS beside L_k on the same test images -> ais.json and ais.safetensors,
    holding the lock of their directory (by default the run's evaluation directory,
    :func:`iwae.runs.evaluation_dir`) and, for a run whose training has not finished, of
    the run's directory too: its weights stay those of one stage end while they are read."""
    unfinished = not training_finished(args.run_dir)
    with locked(args.run_dir) if unfinished else contextlib.nullcontext():
        source, passes = evaluation_dir(args.run_dir)
        out = _out_dir(args, (AIS_FILE, AIS_IMAGES_FILE), default=source)
        with locked(out):
            return _evaluate_ais_locked(args, out, source, passes)


def _evaluate_ais_locked(args, out: Path, source: Path, passes: int | None) -> int:
    """:func:`_evaluate_ais` with ``out`` held; ``source``: where the run's evaluation of
    these weights (L_k per image) would be, ``passes``: None for a finished run."""
    device = pick_device(args.device)
    config, model = load_run(args.run_dir, device)
    dataset = run_dataset(
        config, args.dataset, args.data_dir, check_hash=not args.ignore_dataset_hash
    )
    x = torch.from_numpy(iwae_data.test_images(dataset, args.n_test, config.binarizes)).to(device)
    test_index = iwae_data.test_subset_indices(dataset.test.shape[0], args.n_test)
    stored = read_evaluation_log_px(source, test_index)
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
    if passes is not None:
        result["passes"] = passes
    out.mkdir(parents=True, exist_ok=True)
    write_ais(out, result, per_image, test_index)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        acc = "n/a" if result["ais_acceptance"] is None else f"{result['ais_acceptance']:.2f}"
        print(
            f"log p(x) by AIS (T={result['ais_steps']}, {result['chains']} chains, "
            f"{result['hmc_leapfrog']} leapfrog steps, from {result['ais_init']}; "
            f"{result['n_test']} images): {result['log_px_ais']:.2f} "
            f"+- {result['log_px_ais_stderr']:.2f} nats, HMC acceptance {acc}"
        )
        print(
            f"L_{k} on the same images {result['log_px_iwae']:.2f}; "
            f"AIS - L_{k} = {result['ais_gap']:+.3f} +- {result['ais_gap_stderr']:.3f} nats "
            f"({result['ais_seconds']:.0f} s) -> {out / AIS_FILE}"
        )
        if "bits_per_dim" in result:
            print(_bits_line(result["bits_per_dim"], "AIS", x.shape[1]))
    if passes is not None:
        _unfinished_note(args.run_dir, passes, out)
    return 0


def _bits_line(bits: float, method: str, dims: int) -> str:
    """The NLL in bits per dimension of the 8-bit data (logistic-256)."""
    return (
        f"{bits:.4f} bits per dimension of the 8-bit data ({method}: NLL / ({dims} ln 2), "
        "the levels v = 0..255 of each of the D dimensions)"
    )


def _bdmc(args) -> int:
    """AIS lower and upper bounds on simulated images -> bdmc.json, .safetensors and .png,
    holding the lock of their directory."""
    out = _out_dir(args, (BDMC_FILE, BDMC_IMAGES_FILE, BDMC_FIGURE))
    with locked(out):
        return _bdmc_locked(args, out)


def _bdmc_locked(args, out: Path) -> int:
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
                f"T={t}: {lo:.3f} <= log p(x) <= {up:.3f}  (gap {gap:.3f} nats, mean over "
                f"{args.n} simulated images)"
            )
        print(f"wrote {out / BDMC_FILE} and {out / BDMC_FIGURE} ({sum(result['seconds']):.0f} s)")
    return 0


def _sample(args) -> int:
    """Images drawn from the model -> a PNG grid."""
    out = check_output_file(args.out, args.overwrite, "--out", (".png",))
    config, model = load_run(args.run_dir)
    generator = torch.Generator().manual_seed(args.seed)
    if args.binary and model.likelihood.name != "bernoulli":
        raise IwaeError(
            f"--binary draws Bernoulli pixels: this run's likelihood is {model.likelihood.name}"
        )
    images = model.sample_images(args.n, generator).clamp(0.0, 1.0)
    if args.binary:
        images = torch.bernoulli(images, generator=generator)
    save_image_grid(images.numpy(), make_parents(out), shape=config.image_shape)
    print(f"wrote {args.n} samples to {out}")
    return 0


def _out_dir(args, names: tuple[str, ...], default: Path | None = None) -> Path:
    """--out (created when needed), else ``default`` (RUN_DIR); checked before any work is
    done: result files ``names`` already there are replaced only with --overwrite."""
    fallback = args.run_dir if default is None else default
    return check_output_dir(Path(args.out) if args.out else fallback, names, args.overwrite)


def _machine() -> dict:
    """Where a timing was measured: CPU model, torch version and threads."""
    return {
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
