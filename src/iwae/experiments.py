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
their checkpoints. What one task does in its worker process (:func:`run_one`,
:func:`run_group`): :mod:`iwae.worker`; the order of tasks: :mod:`iwae.schedule`; runs
copied from other directories: :mod:`iwae.reuse`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from iwae.errors import Interrupted, IwaeError
from iwae.experiment_dir import experiment_record, only_values, write_record, write_statuses
from iwae.experiment_dir import select_runs as _select
from iwae.grids import VARIANTS, Run, dreg, table1, toy, two_stage, variants
from iwae.reuse import _as_written as _as_written  # re-exported: tests read configs with it
from iwae.reuse import reuse_runs
from iwae.runlock import locked
from iwae.schedule import LocalPool, RayCluster, Task, plan_tasks, run_tasks
from iwae.worker import EVAL_K, Work, run_group, run_one

__all__ = [  # with names of iwae.grids, iwae.experiment_dir, iwae.reuse, iwae.schedule, iwae.worker
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
    work = Work(
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


def _execute_local(tasks: list[Task], work: Work, options: RunnerOptions) -> list[dict]:
    """The tasks in ``options.workers`` processes here (:class:`iwae.schedule.LocalPool`)."""
    pool = LocalPool(options.workers)
    return run_tasks(tasks, pool, work, options.progress, options.max_retries)


def _execute_ray(tasks: list[Task], work: Work, options: RunnerOptions) -> list[dict]:
    """The tasks as Ray tasks of ``work.threads`` CPUs (:class:`iwae.schedule.RayCluster`)."""
    cluster = RayCluster(work.threads)
    return run_tasks(tasks, cluster, work, options.progress, options.max_retries)
