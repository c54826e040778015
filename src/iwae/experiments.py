"""The published experiments as grids of runs, and the runner that carries them out.

- ``table1``    Burda et al. Table 1: MNIST and OMNIGLOT x 1 and 2 stochastic layers x
                k in {1, 5, 50} x {VAE, IWAE} (24 runs); NLL (k=5000) and active units.
- ``two-stage`` Burda et al. section 5.2: MNIST, 1 layer, VAE then IWAE k=50 and IWAE
                k=50 then VAE; the second stage continues from the first's weights for
                3^(N-1) passes at learning rate 1e-4 (3^7 = 2,187 at the paper's N = 8).
- ``dreg``      beyond the papers: IWAE with the standard and the DReG encoder gradient,
                MNIST, 1 and 2 layers, k in {5, 50}.
- ``variants``  Rainforth et al. 2018: IWAE, PIWAE(4,16), PIWAE(8,8), MIWAE(4,16),
                MIWAE(8,8), CIWAE beta=0.05 and 0.5, VAE; MNIST, 1 layer, 64 samples per
                example, several seeds; IWAE-64, log p-hat(x) and -KL(Q||P).

The budget is ``stages`` (the first N stages of the 3^i schedule; 8 = the paper's 3,280
passes) and ``seeds``. An experiment directory holds ``experiment.json`` (the grid and the
budget) and ``runs/NAME/``, one run directory per run, each finished with
``evaluation.json`` (``iwae evaluate``), ``activity.json`` (per-unit activity) and
``runner.json`` (wall times; training's also by machine). Running an experiment again skips
finished runs and resumes interrupted ones from their checkpoints.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from iwae.errors import IwaeError, TimeLimitReached
from iwae.rundir import read_json

EVAL_K = 5000
CURVE_K = 1000  # samples of log p-hat(x) in learning curves (on the seeded random subset of eval_n test images)


@dataclass(frozen=True)
class Run:
    """One training run of a grid, and the runs whose weights it starts from."""

    name: str
    config: dict  # TrainConfig keys
    after: str | None = None  # run whose final weights initialize this one
    label: dict = field(default_factory=dict)  # what the report groups by


def _name(dataset, layers, objective, k, m=1, beta=None, seed=0) -> str:
    parts = [dataset, f"l{layers}", objective]
    parts += [f"m{m}k{k}"] if m > 1 else [f"k{k}"]
    if beta is not None:
        parts.append(f"b{beta:g}")
    return "-".join(parts) + f"-s{seed}"


def table1(stages: int, seeds: int) -> list[Run]:
    runs = []
    for dataset in ("mnist", "omniglot"):
        for layers in (1, 2):
            for k in (1, 5, 50):
                for objective in ("vae", "iwae"):
                    for seed in range(seeds):
                        config = dict(
                            dataset=dataset,
                            layers=layers,
                            objective=objective,
                            k=k,
                            stages=stages,
                            seed=seed,
                        )
                        label = dict(
                            dataset=dataset, layers=layers, k=k, objective=objective, seed=seed
                        )
                        runs.append(
                            Run(
                                _name(dataset, layers, objective, k, seed=seed), config, label=label
                            )
                        )
    return runs


def two_stage(stages: int, seeds: int) -> list[Run]:
    runs = []
    for seed in range(seeds):
        for exp, (first, second) in enumerate(
            ((("vae", 1), ("iwae", 50)), (("iwae", 50), ("vae", 1))), start=1
        ):
            a = Run(
                f"exp{exp}-first-{first[0]}-k{first[1]}-s{seed}",
                dict(
                    dataset="mnist",
                    layers=1,
                    objective=first[0],
                    k=first[1],
                    stages=stages,
                    seed=seed,
                ),
                label=dict(
                    experiment=exp, stage="first", objective=first[0], k=first[1], seed=seed
                ),
            )
            b = Run(
                f"exp{exp}-second-{second[0]}-k{second[1]}-s{seed}",
                dict(
                    dataset="mnist",
                    layers=1,
                    objective=second[0],
                    k=second[1],
                    epochs=3 ** (stages - 1),
                    lr=1e-4,
                    seed=seed,
                ),
                after=a.name,
                label=dict(
                    experiment=exp, stage="second", objective=second[0], k=second[1], seed=seed
                ),
            )
            runs += [a, b]
    return runs


VARIANTS = [  # (label, key in the paper's table, training options)
    ("IWAE", "iwae", dict(objective="iwae", k=64)),
    ("PIWAE(4,16)", "piwae(4,16)", dict(objective="piwae", m=4, k=16)),
    ("PIWAE(8,8)", "piwae(8,8)", dict(objective="piwae", m=8, k=8)),
    ("MIWAE(4,16)", "miwae(4,16)", dict(objective="miwae", m=4, k=16)),
    ("MIWAE(8,8)", "miwae(8,8)", dict(objective="miwae", m=8, k=8)),
    ("CIWAE beta=0.05", "ciwae(beta=0.05)", dict(objective="ciwae", k=64, beta=0.05)),
    ("CIWAE beta=0.5", "ciwae(beta=0.5)", dict(objective="ciwae", k=64, beta=0.5)),
    ("VAE", "vae", dict(objective="vae", k=64)),
]


def variants(stages: int, seeds: int) -> list[Run]:
    runs = []
    for method, _, keys in VARIANTS:
        for seed in range(seeds):
            config = dict(
                dataset="mnist",
                layers=1,
                stages=stages,
                seed=seed,
                curve_k=CURVE_K,
                eval_every=10**6,
                **keys,
            )
            name = _name(
                "mnist", 1, keys["objective"], keys["k"], keys.get("m", 1), keys.get("beta"), seed
            )
            runs.append(Run(name, config, label=dict(method=method, seed=seed)))
    return runs


# -- the toy of Theorem 1 -----------------------------------------------------------------------


def toy(a: float, b: float, k_max: int) -> dict:
    """X uniform on {a, b}: E[log((X_1 + ... + X_k)/k)] for k = 1..k_max, exactly, by
    enumerating the number j of a's, j ~ Binomial(k, 1/2), against log E[X]. The gap
    log E[X] - E[log mean] is the bias of L_k; Theorem 1 of Burda et al.: it shrinks
    monotonically in k."""
    import math

    if not (a > 0 and b > 0) or not (math.isfinite(a) and math.isfinite(b)):
        raise IwaeError(f"a and b must be positive numbers, got {a} and {b}")
    if k_max < 1:
        raise IwaeError(f"k-max must be >= 1, got {k_max}")
    expected = []
    for k in range(1, k_max + 1):
        log_p = [
            math.lgamma(k + 1) - math.lgamma(j + 1) - math.lgamma(k - j + 1) - k * math.log(2)
            for j in range(k + 1)
        ]
        expected.append(
            sum(math.exp(lp) * math.log((j * a + (k - j) * b) / k) for j, lp in enumerate(log_p))
        )
    log_mean = math.log((a + b) / 2)
    return {
        "a": a,
        "b": b,
        "k": list(range(1, k_max + 1)),
        "expected_log_mean": expected,
        "log_expected": log_mean,
        "bias": [log_mean - e for e in expected],
    }


def dreg(stages: int, seeds: int) -> list[Run]:
    """IWAE trained with the standard (reparam) and the DReG encoder gradient at the same
    budget: MNIST, 1 and 2 layers, k in {5, 50}."""
    runs = []
    for layers in (1, 2):
        for k in (5, 50):
            for estimator in ("reparam", "dreg"):
                for seed in range(seeds):
                    config = dict(
                        dataset="mnist",
                        layers=layers,
                        objective="iwae",
                        k=k,
                        estimator=estimator,
                        stages=stages,
                        seed=seed,
                    )
                    name = _name("mnist", layers, "iwae", k, seed=seed).replace(
                        "-s", f"-{estimator}-s"
                    )
                    runs.append(
                        Run(
                            name,
                            config,
                            label=dict(layers=layers, k=k, estimator=estimator, seed=seed),
                        )
                    )
    return runs


EXPERIMENTS = {"table1": table1, "two-stage": two_stage, "variants": variants, "dreg": dreg}
DEFAULT_SEEDS = {"table1": 1, "two-stage": 1, "variants": 2, "dreg": 1}


def grid(name: str, stages: int, seeds: int | None = None) -> list[Run]:
    if name not in EXPERIMENTS:
        raise IwaeError(f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)}")
    if not 1 <= stages <= 8:
        raise IwaeError(f"stages must be between 1 and 8, got {stages}")
    seeds = DEFAULT_SEEDS[name] if seeds is None else seeds
    if seeds < 1:
        raise IwaeError(f"seeds must be >= 1, got {seeds}")
    return EXPERIMENTS[name](stages, seeds)


# -- running one run -----------------------------------------------------------------------


def run_one(
    run: dict,
    exp_dir: str,
    data_dir: str | None,
    threads: int,
    eval_k: int = EVAL_K,
    n_test: int | None = None,
    flush_denormal: bool = True,
    cuda_graphs: str = "auto",
    stop_at: float | None = None,
) -> dict:
    """Train (or resume) and evaluate one run in ``exp_dir/runs/NAME``; a finished run is
    skipped. Runs in a worker process (local backend) or a Ray task. ``cuda_graphs`` and
    ``stop_at`` (a wall-clock time): as :func:`iwae.train.train`; a run stopped there (or
    not started, the time being past) has status "stopped"."""
    from iwae.rundir import CHECKPOINT_FILE, SUMMARY_FILE
    from iwae.train import TrainConfig, resume, time_limit_passed, train

    run, out = _worker_setup(run, exp_dir, threads, flush_denormal)
    if _evaluated(run, out, eval_k, n_test):
        return {"name": run.name, "status": "skipped"}
    if time_limit_passed(stop_at):  # not started
        return _stopped([run])[0]
    started, trained_before = time.perf_counter(), (out / SUMMARY_FILE).exists()
    try:
        if (out / CHECKPOINT_FILE).exists():  # interrupted (or finished: then resume does nothing)
            resume(out, progress=False, cuda_graphs=cuda_graphs, data_dir=data_dir, stop_at=stop_at)
        elif not trained_before:
            keys = dict(run.config, data_dir=data_dir)
            if run.after is not None:
                keys["init_weights"] = str(Path(exp_dir) / "runs" / run.after / "model.safetensors")
            train(
                TrainConfig(**keys),
                out,
                progress=False,
                overwrite=True,
                cuda_graphs=cuda_graphs,
                stop_at=stop_at,
            )
    except TimeLimitReached:
        return _stopped([run], [out], time.perf_counter() - started)[0]
    if not trained_before:
        _record_training([out], time.perf_counter() - started)
    return _evaluate_run(run, out, data_dir, threads, eval_k, n_test)


def run_group(
    runs: list[dict],
    exp_dir: str,
    data_dir: str | None,
    threads: int,
    eval_k: int = EVAL_K,
    n_test: int | None = None,
    flush_denormal: bool = True,
    cuda_graphs: str = "auto",
    stop_at: float | None = None,
) -> list[dict]:
    """Train (or resume) the runs ``runs`` in lockstep (:func:`iwae.train.train_lockstep`),
    then evaluate each as :func:`run_one` does. The runner groups runs that share a
    lockstep key and stand at the same step (:func:`plan_tasks`)."""
    from iwae.rundir import CHECKPOINT_FILE, SUMMARY_FILE
    from iwae.train import TrainConfig, resume_config, time_limit_passed, train_lockstep

    if len(runs) == 1:
        return [
            run_one(
                runs[0],
                exp_dir,
                data_dir,
                threads,
                eval_k,
                n_test,
                flush_denormal,
                cuda_graphs,
                stop_at,
            )
        ]
    members = [_worker_setup(r, exp_dir, threads, flush_denormal) for r in runs]
    outs = [out for _, out in members]
    if time_limit_passed(stop_at):  # not started
        return _stopped([run for run, _ in members])
    started, trained_before = (
        time.perf_counter(),
        all((out / SUMMARY_FILE).exists() for out in outs),
    )
    try:
        if all((out / CHECKPOINT_FILE).exists() for out in outs):
            train_lockstep(
                [resume_config(out, data_dir) for out in outs],
                outs,
                progress=False,
                resume=True,
                cuda_graphs=cuda_graphs,
                stop_at=stop_at,
            )
        else:
            configs = [TrainConfig(**dict(run.config, data_dir=data_dir)) for run, _ in members]
            train_lockstep(
                configs,
                outs,
                progress=False,
                overwrite=True,
                cuda_graphs=cuda_graphs,
                stop_at=stop_at,
            )
    except TimeLimitReached:
        return _stopped([run for run, _ in members], outs, time.perf_counter() - started)
    if not trained_before:
        _record_training(
            outs, time.perf_counter() - started, lockstep=[run.name for run, _ in members]
        )
    return [_evaluate_run(run, out, data_dir, threads, eval_k, n_test) for run, out in members]


def _stopped(runs: list[Run], outs: list[Path] = (), train_s: float = 0.0) -> list[dict]:
    """The "stopped" statuses of runs at their time limit; the wall time ``train_s`` they
    trained before it is added to the ``runner.json`` of their directories ``outs`` (one
    lockstep group: each is charged its share of those seconds, :func:`_add_train_time`)."""
    _record_training([out for out in outs if out.is_dir()], train_s, group_size=len(outs))
    return [{"name": run.name, "status": "stopped"} for run in runs]


def _record_training(
    outs: list[Path],
    seconds: float,
    lockstep: list[str] | None = None,
    group_size: int | None = None,
) -> None:
    """Add ``seconds`` of training, done by the runs ``outs`` together (one lockstep group of
    ``group_size``, by default ``len(outs)``), to their ``runner.json`` at once, before any
    evaluation: a call killed while evaluating keeps the training time. ``lockstep``: the
    names of the runs trained side by side."""
    from iwae.rundir import write_json

    for out in outs:
        timing = _add_train_time(
            read_json(out / "runner.json", required=False) or {}, seconds, group_size or len(outs)
        )
        if lockstep:
            timing["lockstep"] = lockstep
        write_json(out / "runner.json", timing)


def _add_train_time(
    timing: dict, seconds: float, group_size: int = 1, device: str | None = None
) -> dict:
    """Add ``seconds`` of training to ``timing`` (a ``runner.json``): to ``train_wall_s``
    and, under the machine that trained them (:func:`_device_label`), to
    ``train_wall_s_by_device``: a run may train on a lent GPU, then continue on a CPU.

    ``group_size``: how many runs trained in those ``seconds`` in one lockstep group (one
    process). ``train_share_s_by_device`` gets this run's share, ``seconds / group_size``,
    so that its sum over runs counts each machine's time once (8 runs trained together for
    386 s took 386 s of the GPU, not 8 × 386). ``device``: the machine's label where it was
    not this process's (seconds added afterwards, ``results/add_lost_train_time.py``)."""
    timing["train_wall_s"] = timing.get("train_wall_s", 0.0) + seconds
    label = device or _device_label()
    for key, value in (
        ("train_wall_s_by_device", seconds),
        ("train_share_s_by_device", seconds / group_size),
    ):
        by_device = timing.setdefault(key, {})
        by_device[label] = by_device.get(label, 0.0) + value
    return timing


def _device_label() -> str:
    """Where this process trains (the device :func:`iwae.train.pick_device` picks by
    default), e.g. ``cuda (NVIDIA H100 80GB HBM3)`` or ``cpu (AMD EPYC)``."""
    import torch

    from iwae.train import pick_device

    dev = pick_device()
    return (
        f"cuda ({torch.cuda.get_device_name(dev)})"
        if dev.type == "cuda"
        else f"cpu ({_cpu_name()})"
    )


def _worker_setup(run: dict, exp_dir: str, threads: int, flush_denormal: bool) -> tuple[Run, Path]:
    import torch

    from iwae.train import flush_denormals

    torch.set_num_threads(threads)
    flush_denormals(flush_denormal)
    run = Run(**run)
    return run, Path(exp_dir) / "runs" / run.name


def _evaluated(run: Run, out: Path, eval_k: int, n_test: int | None) -> bool:
    from iwae import data as iwae_data

    done = read_json(out / "evaluation.json", required=False)
    return _evaluated_as_asked(done, eval_k, n_test, iwae_data.TEST_SIZES[run.config["dataset"]])


def _evaluate_run(
    run: Run, out: Path, data_dir, threads: int, eval_k: int, n_test: int | None
) -> dict:
    """Evaluate a trained run on the test images asked for and write ``activity.json``,
    ``runner.json`` (its evaluation's wall time beside the training's, which
    :func:`_record_training` wrote) and, last, the evaluation files."""
    import torch

    from iwae import data as iwae_data
    from iwae.evaluate import evaluate_images, unit_activity
    from iwae.rundir import write_evaluation, write_json
    from iwae.train import load_run

    timing = read_json(out / "runner.json", required=False) or {}
    started = time.perf_counter()
    config, model = load_run(out)
    dataset = iwae_data.load_dataset(config.dataset, data_dir)
    x = torch.from_numpy(iwae_data.binarized_test(dataset, n_test))
    result, per_image = evaluate_images(model, x, k=eval_k, seed=0)
    result.update(iwae_data.test_subset_record(dataset.test.shape[0], n_test))
    activity = [a.tolist() for a in unit_activity(model, x)]
    timing.update(
        eval_wall_s=time.perf_counter() - started,
        threads=threads,
        host=socket.gethostname(),
        cpu=_cpu_name(),
        torch=torch.__version__,
    )
    write_json(out / "activity.json", {"unit_activity": activity, "threshold": 0.01})
    write_json(out / "runner.json", timing)
    # last: evaluation.json marks the run finished
    write_evaluation(
        out, result, per_image, iwae_data.test_subset_indices(dataset.test.shape[0], n_test)
    )
    return {"name": run.name, "status": "done", **result}


def _evaluated_as_asked(done: dict | None, eval_k: int, n_test: int | None, full: int) -> bool:
    """Whether an ``evaluation.json`` used ``eval_k`` samples on the test images asked for:
    the whole set, or the seeded random subset of ``n_test`` (an evaluation on the first N
    images, made before subsets were random, is done again)."""
    from iwae.data import TEST_SUBSET_SEED

    n = min(n_test or full, full)
    if not done or (done.get("k"), done.get("n_test")) != (eval_k, n):
        return False
    return n == full or done.get("test_subset_seed") == TEST_SUBSET_SEED


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- the runner -------------------------------------------------------------------------------


def reproduce(
    name: str,
    out: str | Path,
    stages: int = 4,
    seeds: int | None = None,
    workers: int = 1,
    backend: str = "local",
    data_dir: str | None = None,
    progress: bool = True,
    overrides: dict | None = None,
    eval_k: int = EVAL_K,
    n_test: int | None = None,
    only: dict | None = None,
    threads: int | None = None,
    reuse: list[str | Path] | None = None,
    flush_denormal: bool = True,
    lockstep: bool = True,
    group_size: int = 8,
    cuda_graphs: str = "auto",
    time_limit: float | None = None,
) -> list[dict]:
    """Run experiment ``name`` in ``out`` with ``workers`` parallel runs; finished runs are
    skipped and interrupted ones resumed. Returns one status per run.

    ``only`` keeps the runs whose labels match (e.g. ``{"dataset": "mnist"}``, or
    ``{"method": ["VAE", "IWAE"]}`` for either; a run's first stage is kept with it). ``overrides`` (training options applied to every run),
    ``eval_k`` and ``n_test`` (evaluate on a seeded random subset of N test images) shrink an experiment
    for tests and smoke runs. All of them are recorded in ``experiment.json``. ``threads``
    per run defaults to the cores divided by ``workers``. ``reuse``: experiment directories
    whose finished runs are copied in, instead of trained again, wherever a run here has
    the identical training configuration (:func:`reuse_runs`). ``lockstep``: train runs that
    can share a process side by side, up to ``group_size`` at a time (:func:`plan_tasks`).
    ``cuda_graphs``: "auto" replays training steps from CUDA graphs on a GPU, "off" never.
    ``time_limit``: minutes after which training stops, every run in training checkpointed
    (status "stopped"; runs not yet started are not started): the same call continues."""
    runs = _select(
        [
            Run(r.name, {**r.config, **(overrides or {})}, r.after, r.label)
            for r in grid(name, stages, seeds)
        ],
        name,
        only,
    )
    if workers < 1:
        raise IwaeError(f"workers must be >= 1, got {workers}")
    if group_size < 1:
        raise IwaeError(f"group size must be >= 1, got {group_size}")
    if time_limit is not None and not time_limit > 0:
        raise IwaeError(f"time limit must be > 0 minutes, got {time_limit}")
    stop_at = None if time_limit is None else time.time() + 60 * time_limit
    if backend not in ("local", "ray"):
        raise IwaeError(f"unknown backend {backend!r}: choose local or ray")
    out = Path(out)
    meta = {
        "experiment": name,
        "stages": stages,
        "seeds": seeds or DEFAULT_SEEDS[name],
        "passes_per_run": sum(3**i for i in range(stages)),
        "eval_k": eval_k,
        "n_test": n_test,
        "overrides": overrides or {},
        "only": only or {},
        "reuse": [str(d) for d in reuse or []],
        "runs": [asdict(r) for r in runs],
    }
    meta = _merge_with_previous(out, meta, only)
    if data_dir is None:  # resolve now, so workers and Ray tasks read the same directory
        from iwae.data import resolve_data_dir

        data_dir = str(resolve_data_dir(None))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    from iwae.rundir import write_json

    write_json(out / "experiment.json", meta)
    if reuse:
        reuse_runs(runs, out, [Path(d) for d in reuse], data_dir, progress)
    if threads is None:  # never more threads than cores in all: oversubscribed torch threads crawl
        threads = max(1, (os.cpu_count() or 1) // workers) if backend == "local" else 1
    tasks = plan_tasks(runs, out, data_dir, group_size if lockstep else 1, workers)
    execute = _execute_ray if backend == "ray" else _execute_local
    return execute(
        tasks,
        str(out),
        data_dir,
        threads,
        workers,
        progress,
        (eval_k, n_test, flush_denormal, cuda_graphs, stop_at),
    )


def only_values(value: str | list[str]) -> list[str]:
    """The values one ``only`` key accepts: a single value, or a list of them."""
    return value if isinstance(value, list) else [value]


def _select(runs: list[Run], name: str, only: dict | None) -> list[Run]:
    """The runs whose labels match ``only``, with the runs they continue. ``only`` maps a
    label key to a value, or to a list of values of which the run's must be one."""
    if not only:
        return runs

    def matches(label: dict) -> bool:
        return all(str(label.get(k)) in [str(x) for x in only_values(v)] for k, v in only.items())

    keep = {r.name for r in runs if matches(r.label)}
    keep |= {r.after for r in runs if r.name in keep and r.after}
    if not keep:
        raise IwaeError(f"no run of {name} matches {only}")
    return [r for r in runs if r.name in keep]


def _merge_with_previous(out: Path, meta: dict, only: dict | None) -> dict:
    """``experiment.json``'s new content: a directory holds one experiment at one budget; the
    runs, ``--only`` filters and ``--reuse`` sources of earlier invocations stay listed."""
    previous = read_json(out / "experiment.json", required=False)
    if previous is None:
        return meta
    if (previous.get("experiment"), previous.get("stages"), previous.get("seeds")) != (
        meta["experiment"],
        meta["stages"],
        meta["seeds"],
    ):
        raise IwaeError(
            f"{out} holds experiment {previous.get('experiment')} at stages={previous.get('stages')}, "
            f"seeds={previous.get('seeds')}: use another --out for a different budget"
        )
    names = {r["name"] for r in meta["runs"]}
    meta["runs"] = [r for r in previous.get("runs", []) if r["name"] not in names] + meta["runs"]
    meta["only"] = [f for f in (*_as_list(previous.get("only")), *_as_list(only)) if f]
    meta["reuse"] = list(dict.fromkeys([*previous.get("reuse", []), *meta["reuse"]]))
    return meta


#: on the CPU lockstep pays for small steps only: at the default batch 20, samples per
#: example x batch below this many rows (k <= 5 for one-sample-group objectives); the
#: per-step overhead it shares matters less and less above (bench/RESULTS.md: lockstep_speedup)
LOCKSTEP_MAX_ROWS_CPU = 256


def plan_tasks(
    runs: list[Run], out: Path, data_dir: str | None, group_size: int, workers: int = 1
) -> list[tuple[Run, ...]]:
    """The runner's tasks: groups of up to ``group_size`` runs trained in lockstep, and
    single runs. Runs are grouped when their training can share one stacked model
    (:func:`iwae.train.lockstep_key`), they stand at the same step (none started, or all
    checkpointed at one position), they do not continue another run, and lockstep pays on
    this machine (always on a GPU; on the CPU below :data:`LOCKSTEP_MAX_ROWS_CPU` rows per
    step). Groups are formed in grid order, and the largest is halved while there are
    fewer tasks than ``workers`` (no idle worker), so a killed group is formed again alike."""
    import torch

    from iwae.rundir import CHECKPOINT_FILE, SUMMARY_FILE, checkpoint_meta
    from iwae.train import TrainConfig, lockstep_key, settle_group_checkpoint

    cuda = torch.cuda.is_available()
    groups: dict[tuple, list[Run]] = {}
    tasks: list[tuple[Run, ...]] = []
    for run in runs:
        d = out / "runs" / run.name
        settle_group_checkpoint(d)
        config = TrainConfig(**dict(run.config, data_dir=data_dir))
        meta = checkpoint_meta(d / CHECKPOINT_FILE)
        position = (
            (0, 0) if meta is None else (meta["progress"]["passes"], meta["progress"]["step"])
        )
        rows = config.rows_per_step
        if (
            group_size < 2
            or run.after
            or (d / SUMMARY_FILE).exists()
            or not (cuda or rows < LOCKSTEP_MAX_ROWS_CPU)
        ):
            tasks.append((run,))
        else:
            groups.setdefault((lockstep_key(config), position), []).append(run)
    for members in groups.values():
        tasks += [tuple(members[i : i + group_size]) for i in range(0, len(members), group_size)]
    while len(tasks) < workers and any(len(t) > 1 for t in tasks):
        largest = max(tasks, key=len)
        i, half = tasks.index(largest), (len(largest) + 1) // 2
        tasks[i : i + 1] = [largest[:half], largest[half:]]
    return tasks


#: configuration keys that do not change what a run computes
_NOT_COMPARED = ("data_dir", "checkpoint_minutes", "stage_nll_k")


def reuse_runs(
    runs: list[Run], out: Path, sources: list[Path], data_dir: str | None, progress: bool = True
) -> list[str]:
    """Copy into ``out/runs`` every finished run of the experiment directories ``sources``
    whose training configuration equals that of a run here that has no directory yet
    (runs that start from another run's weights are not reused). A copied run keeps its
    training (weights, metrics, summary); it is evaluated here as this experiment asks,
    unless its evaluation already matches. Returns the names of the runs copied."""
    import shutil

    from iwae.rundir import CONFIG_FILE, SUMMARY_FILE, WEIGHTS_FILE, write_json
    from iwae.train import TrainConfig

    for source in sources:
        if not (source / "runs").is_dir():
            raise IwaeError(f"--reuse {source}: not an experiment directory (no runs/ in it)")
    finished = []  # (config without the keys that do not matter, run directory)
    for source in sources:
        for run_dir in sorted((source / "runs").iterdir()):
            config = read_json(run_dir / CONFIG_FILE, required=False)
            if (
                isinstance(config, dict)
                and (run_dir / SUMMARY_FILE).exists()
                and (run_dir / WEIGHTS_FILE).exists()
            ):
                config = _as_written(config)
                if config is not None:
                    finished.append(
                        (_training_key(config, exact=True), _training_key(config), run_dir)
                    )
    copied = []
    for run in runs:
        target = out / "runs" / run.name
        if run.after is not None or target.exists():
            continue
        config = json.loads(
            json.dumps(TrainConfig(**run.config, data_dir=data_dir).to_dict())
        )  # lists, as in config.json
        exact, same = _training_key(config, exact=True), _training_key(config)
        match = next(
            (d for key, _, d in finished if key == exact), None
        )  # the same run if there is one
        match = match or next((d for _, key, d in finished if key == same), None)
        if match is None:
            continue
        partial = target.with_name(target.name + ".copying")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(
            match,
            partial,
            ignore=shutil.ignore_patterns(
                "checkpoint.safetensors", "checkpoint.next.safetensors", "tb"
            ),
        )
        timing = read_json(partial / "runner.json", required=False) or {}
        timing["reused_from"] = str(match)
        write_json(partial / "runner.json", timing)
        partial.rename(target)  # all at once: a half-copied run is never taken for a run
        copied.append(run.name)
        if progress:
            print(f"{run.name}: reused from {match}", flush=True)
    return copied


def _as_written(config: dict) -> dict | None:
    """The keys of ``config`` as this version writes them into ``config.json`` (lists, and
    the keys an older version did not write at the values they stand for), or None if it is
    not a valid configuration."""
    from iwae.train import TrainConfig

    try:
        return json.loads(json.dumps(TrainConfig.from_dict(config).to_dict()))
    except (IwaeError, TypeError, ValueError):  # a hand-edited config.json can hold anything
        return None


def _training_key(config: dict, exact: bool = False) -> dict:
    """What a run's training computes, from its ``config.json`` keys: without the keys that
    change nothing (:data:`_NOT_COMPARED`), and with VAE and IWAE at k = 1 written alike:
    both are then the ELBO of one sample, L_1, the same value and gradient bit for bit
    (logsumexp of one log-weight is that log-weight), so Table 1's VAE k=1 and IWAE k=1
    are one training run (``exact``: written as they are)."""
    key = {k: v for k, v in config.items() if k not in _NOT_COMPARED}
    if (
        not exact
        and key.get("objective") in ("vae", "iwae")
        and key.get("k") == 1
        and key.get("m", 1) == 1
        and key.get("estimator", "reparam") in ("reparam", "stl")
    ):
        key["objective"] = "vae=iwae(k=1)"
    return key


def _as_list(only) -> list:
    return only if isinstance(only, list) else [only] if only else []


def _ready(
    tasks: list[tuple[Run, ...]], done: set[str], started: set[str]
) -> list[tuple[Run, ...]]:
    """Tasks whose runs' first stages are done, the most expensive first (fewer idle workers at the end)."""
    ready = [
        t
        for t in tasks
        if t[0].name not in started and all(r.after is None or r.after in done for r in t)
    ]
    return sorted(ready, key=lambda t: -sum(_cost(r) for r in t))


def _cost(run: Run) -> float:
    """A run's relative training cost: rows per step x stochastic layers, twice where the
    gradient takes two backward passes (the "split" route of :data:`iwae.bounds.GRADIENT_ROUTES`)."""
    from iwae.train import TrainConfig

    config = TrainConfig.from_dict(run.config)
    return (
        config.rows_per_step * config.layers * (2 if config.objective_spec.route == "split" else 1)
    )


def _execute_local(tasks, out, data_dir, threads, workers, progress, evaluation) -> list[dict]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from iwae.progress import progress_bar

    results, done, started, pending = [], set(), set(), {}
    total = sum(len(t) for t in tasks)
    with (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool,
        progress_bar(total, "runs", "run", enabled=progress, interval=0) as bar,
    ):
        while len(done) < total:
            for task in _ready(tasks, done, started):
                pending[
                    pool.submit(
                        run_group, [asdict(r) for r in task], out, data_dir, threads, *evaluation
                    )
                ] = task
                started.update(r.name for r in task)
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                task = pending.pop(future)
                results += future.result()  # a failed run raises here, after the others stop
                done.update(r.name for r in task)
                bar.set_postfix_str(
                    f"{'+'.join(r.name for r in task)}: {results[-1]['status']}", refresh=False
                )
                bar.update(len(task))
    return results


def _execute_ray(tasks, out, data_dir, threads, workers, progress, evaluation) -> list[dict]:
    try:
        import ray
    except ModuleNotFoundError:
        raise IwaeError("the ray backend needs Ray: pip install 'iwae[ray]'") from None
    if not ray.is_initialized():
        ray.init()  # connects to RAY_ADDRESS or a running cluster, else starts a local one
    remote = ray.remote(num_cpus=threads)(run_group)
    results, done, started, pending = [], set(), set(), {}
    total = sum(len(t) for t in tasks)
    while len(done) < total:
        for task in _ready(tasks, done, started):
            pending[
                remote.remote([asdict(r) for r in task], out, data_dir, threads, *evaluation)
            ] = task
            started.update(r.name for r in task)
        finished, _ = ray.wait(list(pending), num_returns=1)
        for ref in finished:
            task = pending.pop(ref)
            results += ray.get(ref)
            done.update(r.name for r in task)
            if progress:
                print(
                    f"[{len(done)}/{total}] {'+'.join(r.name for r in task)}: {results[-1]['status']}",
                    flush=True,
                )
    return results
