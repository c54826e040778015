"""The published experiments, and the runner that carries them out.

:data:`EXPERIMENTS` lists them, one :class:`Experiment` per published table: its grid of
runs (:mod:`iwae.grids`), default seeds, a line for the command line's help and the title
of its section in the report (:mod:`iwae.report` renders each by name).

:func:`reproduce` runs one in an experiment directory, as :class:`RunnerOptions` say (local
processes or Ray, lockstep groups, threads, evaluation): the budget is ``stages`` (the first
N stages of the 3^i schedule; 8 = the paper's 3,280 passes) and ``seeds``. An experiment
directory holds ``experiment.json`` (the grid and the budget) and ``runs/NAME/``, one run
directory per run, each finished with ``evaluation.json`` (``iwae evaluate``),
``activity.json`` (per-unit activity) and ``runner.json`` (wall times; training's also by
machine). Running an experiment again skips finished runs and resumes interrupted ones from
their checkpoints. What one task does in its worker process: :func:`run_one` and
:func:`run_group`; the order of tasks: :mod:`iwae.schedule`; runs copied from other
directories: :mod:`iwae.reuse`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from iwae import interrupts
from iwae.errors import Interrupted, IwaeError, TimeLimitReached, TrainingStopped
from iwae.experiment_dir import experiment_record, only_values, write_record, write_statuses
from iwae.experiment_dir import select_runs as _select
from iwae.grids import VARIANTS, Run, dreg, table1, toy, two_stage, variants
from iwae.reuse import _as_written as _as_written  # re-exported: tests read configs with it
from iwae.reuse import reuse_runs
from iwae.rundir import read_json
from iwae.runlock import locked
from iwae.schedule import LocalPool, RayCluster, Task, plan_tasks, run_tasks

__all__ = [  # with names of iwae.grids, iwae.experiment_dir, iwae.reuse and iwae.schedule
    "EVAL_K",
    "EXPERIMENTS",
    "experiments_help",
    "VARIANTS",
    "Experiment",
    "Run",
    "RunnerOptions",
    "grid",
    "only_values",
    "plan_tasks",
    "reproduce",
    "reuse_runs",
    "run_group",
    "run_one",
    "toy",
]

EVAL_K = 5000


@dataclass(frozen=True)
class Experiment:
    """A published experiment: ``grid(stages, seeds)`` lists its runs (:mod:`iwae.grids`),
    ``seeds`` per configuration by default; ``description`` is its line in the command
    line's help, ``title`` the heading of its section in the report."""

    name: str
    description: str
    grid: Callable[[int, int], list[Run]]
    seeds: int
    title: str


#: every experiment, in the order of the command line's choices and the report's sections
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "table1", "Burda et al. Table 1 (24 runs)", table1, 1, "Burda et al. (2016), Table 1"
        ),
        Experiment(
            "two-stage",
            "Burda et al.'s two-stage training (4 runs)",
            two_stage,
            1,
            "Burda et al. (2016), two-stage training (MNIST, 1 layer)",
        ),
        Experiment(
            "variants",
            "Rainforth et al.'s IWAE variants (8 methods x seeds)",
            variants,
            2,
            "Rainforth et al. (2018), IWAE variants (MNIST, 1 layer, 64 samples per example)",
        ),
        Experiment(
            "dreg",
            "IWAE with the standard and the DReG encoder gradient (8 runs)",
            dreg,
            1,
            "Beyond the papers: IWAE with the DReG encoder gradient (MNIST)",
        ),
    )
}


def experiments_help() -> str:
    """The experiments in words for the command line's help: ``NAME: description; ...``."""
    return "; ".join(f"{e.name}: {e.description}" for e in EXPERIMENTS.values()) + "."


def grid(name: str, stages: int, seeds: int | None = None) -> list[Run]:
    """The runs of experiment ``name`` at ``stages`` stages and ``seeds`` seeds (default: the
    experiment's)."""
    if name not in EXPERIMENTS:
        raise IwaeError(f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)}")
    if not 1 <= stages <= 8:
        raise IwaeError(f"stages must be between 1 and 8, got {stages}")
    experiment = EXPERIMENTS[name]
    seeds = experiment.seeds if seeds is None else seeds
    if seeds < 1:
        raise IwaeError(f"seeds must be >= 1, got {seeds}")
    return experiment.grid(stages, seeds)


# -- the runner ---------------------------------------------------------------------------------

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class RunnerOptions:
    """How :func:`reproduce` carries out an experiment's runs.

    ``workers`` runs at a time, as processes here (``backend`` "local") or Ray tasks
    ("ray"), with ``threads`` torch threads each (default: the cores divided by
    ``workers``; 1 on Ray). ``lockstep``: train runs that can share a process side by side,
    up to ``group_size`` at a time (:func:`iwae.schedule.plan_tasks`). Each run is evaluated
    by L_``eval_k`` on the whole test set, or on a seeded random subset of ``n_test``
    images. ``flush_denormal`` and ``cuda_graphs`` ("auto": replay training steps from CUDA
    graphs on a GPU; "off": never): as :func:`iwae.train.train`. ``time_limit``: minutes
    after which training stops, every run in training checkpointed (status "stopped"; runs
    not yet started are not started): the same call continues them. ``max_retries``: times
    a task whose process died is run again from its runs' checkpoints
    (:func:`iwae.schedule.run_tasks`). ``progress``: a line per finished task."""

    workers: int = 1
    backend: str = "local"
    threads: int | None = None
    lockstep: bool = True
    group_size: int = 8
    eval_k: int = EVAL_K
    n_test: int | None = None
    flush_denormal: bool = True
    cuda_graphs: str = "auto"
    time_limit: float | None = None
    progress: bool = True
    max_retries: int = 2

    def __post_init__(self):
        if self.workers < 1:
            raise IwaeError(f"workers must be >= 1, got {self.workers}")
        if self.max_retries < 0:
            raise IwaeError(f"max retries must be >= 0, got {self.max_retries}")
        if self.group_size < 1:
            raise IwaeError(f"group size must be >= 1, got {self.group_size}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise IwaeError(f"time limit must be > 0 minutes, got {self.time_limit}")
        if self.backend not in BACKENDS:
            raise IwaeError(f"unknown backend {self.backend!r}: choose local or ray")

    def threads_per_run(self) -> int:
        """Torch threads per run: never more than the cores in all, for oversubscribed torch
        threads crawl."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.workers) if self.backend == "local" else 1


def reproduce(
    name: str,
    out: str | Path,
    stages: int = 4,
    seeds: int | None = None,
    *,
    data_dir: str | None = None,
    overrides: dict | None = None,
    only: dict | None = None,
    reuse: list[str | Path] | None = None,
    options: RunnerOptions | None = None,
    **runner: Any,
) -> list[dict]:
    """Run experiment ``name`` in ``out`` as ``options`` say, or the defaults of
    :class:`RunnerOptions` changed by the keywords ``runner`` (``workers=4``); finished runs
    are skipped and interrupted ones resumed. Returns one status per run.

    ``only`` keeps the runs whose labels match (e.g. ``{"dataset": "mnist"}``, or
    ``{"method": ["VAE", "IWAE"]}`` for either; a run's first stage is kept with it).
    ``overrides`` (training options applied to every run), ``eval_k`` and ``n_test`` shrink
    an experiment for tests and smoke runs. All of them are recorded in ``experiment.json``.
    ``reuse``: experiment directories whose finished runs are copied in, instead of trained
    again, wherever a run here has the identical training configuration
    (:func:`iwae.reuse.reuse_runs`).

    Holds the lock of ``out`` (:mod:`iwae.runlock`; each worker holds its runs'), and
    writes every run's status to ``out/runner.json`` (:func:`write_statuses`). SIGINT or
    SIGTERM is passed on to the runs in training, which checkpoint and stop; then
    :class:`iwae.errors.Interrupted` is raised (:func:`iwae.schedule.run_tasks`)."""
    options = replace(options or RunnerOptions(), **runner)
    with locked(out):
        return _reproduce(name, Path(out), stages, seeds, data_dir, overrides, only, reuse, options)


def _reproduce(
    name: str,
    out: Path,
    stages: int,
    seeds: int | None,
    data_dir: str | None,
    overrides: dict | None,
    only: dict | None,
    reuse: list | None,
    options: RunnerOptions,
) -> list[dict]:
    """:func:`reproduce` in the locked experiment directory ``out``."""
    stop_at = None if options.time_limit is None else time.time() + 60 * options.time_limit
    runs = [
        Run(r.name, {**r.config, **(overrides or {})}, r.after, r.label)
        for r in grid(name, stages, seeds)
    ]
    runs, out = _select(runs, name, only), Path(out)
    seeds = seeds or EXPERIMENTS[name].seeds
    evaluation = (options.eval_k, options.n_test)
    meta = experiment_record(name, stages, seeds, runs, evaluation, overrides, only, reuse)
    if data_dir is None:  # resolve now, so workers and Ray tasks read the same directory
        from iwae.data import resolve_data_dir

        data_dir = str(resolve_data_dir(None))
    write_record(out, meta, only)
    if reuse:
        reuse_runs(runs, out, [Path(d) for d in reuse], data_dir, options.progress)
    group_size = options.group_size if options.lockstep else 1
    tasks = plan_tasks(runs, out, data_dir, group_size, options.workers)
    work = _Work(
        str(out),
        data_dir,
        options.threads_per_run(),
        *evaluation,
        options.flush_denormal,
        options.cuda_graphs,
        stop_at,
    )
    execute = _execute_ray if options.backend == "ray" else _execute_local
    try:
        results = execute(tasks, work, options)
    except Interrupted as stop:
        write_statuses(out, stop.results)
        raise
    write_statuses(out, results)
    return results


@dataclass(frozen=True)
class _Work:
    """What a worker does with one task (:func:`run_group`), and what every task of one
    :func:`reproduce` call shares: the experiment directory, the data directory, torch
    threads per run, the evaluation asked for, the training switches and the wall-clock
    time ``stop_at`` at which training stops. Picklable, for worker processes and Ray."""

    exp_dir: str
    data_dir: str
    threads: int
    eval_k: int
    n_test: int | None
    flush_denormal: bool
    cuda_graphs: str
    stop_at: float | None

    def __call__(self, task: Task) -> list[dict]:
        """The statuses of the task's runs; a stop signal (:mod:`iwae.interrupts`) ends it
        with its runs checkpointed ("interrupted")."""
        try:
            with interrupts.catching():
                return run_group(
                    [asdict(r) for r in task],
                    self.exp_dir,
                    self.data_dir,
                    self.threads,
                    self.eval_k,
                    self.n_test,
                    self.flush_denormal,
                    self.cuda_graphs,
                    self.stop_at,
                )
        except Interrupted:
            return [{"name": r.name, "status": "interrupted"} for r in task]


def _execute_local(tasks: list[Task], work: _Work, options: RunnerOptions) -> list[dict]:
    """The tasks in ``options.workers`` processes here (:class:`iwae.schedule.LocalPool`)."""
    pool = LocalPool(options.workers)
    return run_tasks(tasks, pool, work, options.progress, options.max_retries)


def _execute_ray(tasks: list[Task], work: _Work, options: RunnerOptions) -> list[dict]:
    """The tasks as Ray tasks of ``work.threads`` CPUs (:class:`iwae.schedule.RayCluster`)."""
    cluster = RayCluster(work.threads)
    return run_tasks(tasks, cluster, work, options.progress, options.max_retries)


# -- what a worker does with one task -------------------------------------------------------------


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
    skipped. Runs in a worker process (local backend) or a Ray task, holding the run
    directory's lock (:mod:`iwae.runlock`). ``cuda_graphs`` and ``stop_at`` (a wall-clock
    time): as :func:`iwae.train.train`; a run stopped there (or not started, the time being
    past) has status "stopped", a run stopped by SIGINT or SIGTERM (checkpointed, not
    evaluated) "interrupted"."""
    from iwae.rundir import SUMMARY_FILE
    from iwae.train import time_limit_passed

    run, out = _worker_setup(run, exp_dir, threads, flush_denormal)
    if _evaluated(run, out, eval_k, n_test):
        return {"name": run.name, "status": "skipped"}
    if time_limit_passed(stop_at):  # not started
        return _stopped([run])[0]
    with interrupts.catching(), locked(out):
        started, trained_before = time.perf_counter(), (out / SUMMARY_FILE).exists()
        try:
            _train_one(run, out, exp_dir, data_dir, cuda_graphs, stop_at, trained_before)
        except TrainingStopped as stop:
            return _stopped([run], [out], time.perf_counter() - started, _stop_status(stop))[0]
        if not trained_before:
            _record_training([out], time.perf_counter() - started)
        if interrupts.received() is not None:  # training ended as the signal came
            return {"name": run.name, "status": "interrupted"}
        return _evaluate_run(run, out, data_dir, threads, eval_k, n_test)


def _train_one(
    run: Run,
    out: Path,
    exp_dir: str,
    data_dir: str | None,
    cuda_graphs: str,
    stop_at: float | None,
    trained_before: bool,
) -> None:
    """Resume the run in ``out`` from its checkpoint (a finished one: nothing to do), or
    train it from the start (a second stage from its first stage's weights)."""
    from iwae.checkpoint import checkpoint_exists
    from iwae.train import TrainConfig, resume, train

    if checkpoint_exists(out):  # interrupted (or finished: then resume does nothing)
        resume(
            out,
            progress=False,
            cuda_graphs=cuda_graphs,
            data_dir=data_dir,
            stop_at=stop_at,
            fallback=True,
        )
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


def _stop_status(stop: TrainingStopped) -> str:
    """A run's status when its training stopped: "stopped" at the time limit, else
    "interrupted" (a signal)."""
    return "stopped" if isinstance(stop, TimeLimitReached) else "interrupted"


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
    then evaluate each as :func:`run_one` does, holding their directories' locks. The
    runner groups runs that share a lockstep key and stand at the same step
    (:func:`plan_tasks`)."""
    from iwae.rundir import SUMMARY_FILE
    from iwae.train import time_limit_passed

    if len(runs) == 1:
        one = (exp_dir, data_dir, threads, eval_k, n_test, flush_denormal, cuda_graphs, stop_at)
        return [run_one(runs[0], *one)]
    members = [_worker_setup(r, exp_dir, threads, flush_denormal) for r in runs]
    outs = [out for _, out in members]
    if time_limit_passed(stop_at):  # not started
        return _stopped([run for run, _ in members])
    with interrupts.catching(), contextlib.ExitStack() as held:
        for out in outs:
            held.enter_context(locked(out))
        started = time.perf_counter()
        trained_before = all((out / SUMMARY_FILE).exists() for out in outs)
        try:
            _train_group(members, data_dir, cuda_graphs, stop_at)
        except TrainingStopped as stop:
            train_s = time.perf_counter() - started
            return _stopped([run for run, _ in members], outs, train_s, _stop_status(stop))
        if not trained_before:
            _record_training(
                outs, time.perf_counter() - started, lockstep=[run.name for run, _ in members]
            )
        if interrupts.received() is not None:  # training ended as the signal came
            return [{"name": run.name, "status": "interrupted"} for run, _ in members]
        return [_evaluate_run(run, out, data_dir, threads, eval_k, n_test) for run, out in members]


def _train_group(
    members: list[tuple[Run, Path]], data_dir: str | None, cuda_graphs: str, stop_at: float | None
) -> None:
    """Train the runs ``members`` (run, its directory) in lockstep: resumed where every one
    has a checkpoint (finished ones: nothing to do), else from the start."""
    from iwae.checkpoint import checkpoint_exists
    from iwae.train import TrainConfig, resume_config, train_lockstep

    outs = [out for _, out in members]
    if all(checkpoint_exists(out) for out in outs):
        configs = [resume_config(out, data_dir) for out in outs]
        start = dict(resume=True, fallback=True)
    else:
        configs = [TrainConfig(**dict(run.config, data_dir=data_dir)) for run, _ in members]
        start = dict(overwrite=True)
    train_lockstep(configs, outs, progress=False, cuda_graphs=cuda_graphs, stop_at=stop_at, **start)


def _stopped(
    runs: list[Run], outs: list[Path] = (), train_s: float = 0.0, status: str = "stopped"
) -> list[dict]:
    """The statuses of runs stopped at their time limit ("stopped") or by a signal
    ("interrupted"); the wall time ``train_s`` they trained before it is added to the
    ``runner.json`` of their directories ``outs`` (one lockstep group: each is charged its
    share of those seconds, :func:`_add_train_time`)."""
    _record_training([out for out in outs if out.is_dir()], train_s, group_size=len(outs))
    return [{"name": run.name, "status": status} for run in runs]


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


def _add_train_time(timing: dict, seconds: float, group_size: int = 1) -> dict:
    """Add ``seconds`` of training to ``timing`` (a ``runner.json``): to ``train_wall_s``
    and, under the machine that trained them (:func:`_device_label`), to
    ``train_wall_s_by_device``: a run may train on a GPU, then continue on a CPU.

    ``group_size``: how many runs trained in those ``seconds`` in one lockstep group (one
    process). ``train_share_s_by_device`` gets this run's share, ``seconds / group_size``,
    so that its sum over runs counts each machine's time once (8 runs trained together for
    386 s took 386 s of the GPU, not 8 × 386)."""
    timing["train_wall_s"] = timing.get("train_wall_s", 0.0) + seconds
    label = _device_label()
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
    """Set this worker's torch threads and denormal flushing; the run and its directory."""
    import torch

    from iwae.train import flush_denormals

    torch.set_num_threads(threads)
    flush_denormals(flush_denormal)
    run = Run(**run)
    return run, Path(exp_dir) / "runs" / run.name


def _evaluated(run: Run, out: Path, eval_k: int, n_test: int | None) -> bool:
    """Whether the run in ``out`` is evaluated as asked (:func:`_evaluated_as_asked`)."""
    from iwae import data as iwae_data

    done = read_json(out / "evaluation.json", required=False)
    if not done:
        return False
    dataset = run.config["dataset"]
    full = iwae_data.TEST_SIZES.get(dataset) or iwae_data.load_dataset(dataset).test.shape[0]
    return _evaluated_as_asked(done, eval_k, n_test, full)


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
    """The CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
