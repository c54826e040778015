"""Scheduling an experiment's runs: tasks (lockstep groups and single runs), and the one
loop that hands them to an executor, a local process pool or a Ray cluster.

A task is a tuple of :class:`iwae.grids.Run` trained together (:func:`plan_tasks`). The
loop (:func:`run_tasks`) submits every task whose runs' first stages are done, the most
expensive first, waits for any one to finish, records its statuses and submits what became
ready, until every run is done. An executor (:class:`LocalPool`, :class:`RayCluster`) only
submits a call and waits for the first of several to finish.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

from iwae.errors import IwaeError
from iwae.grids import Run
from iwae.progress import progress_bar

Task = tuple[Run, ...]

#: on the CPU lockstep pays for small steps only: at the default batch 20, samples per
#: example x batch below this many rows (k <= 5 for one-sample-group objectives); the
#: per-step overhead it shares matters less and less above (bench/RESULTS.md: lockstep_speedup)
LOCKSTEP_MAX_ROWS_CPU = 256


def plan_tasks(
    runs: list[Run], out: Path, data_dir: str | None, group_size: int, workers: int = 1
) -> list[Task]:
    """The runner's tasks: groups of up to ``group_size`` runs trained in lockstep, and
    single runs. Runs are grouped when their training can share one stacked model
    (:func:`iwae.train.lockstep_key`; never conv models: :func:`iwae.lockstep.stackable`),
    they stand at the same step (none started, or all
    checkpointed at one position), they do not continue another run, and lockstep pays on
    this machine (always on a GPU; on the CPU below :data:`LOCKSTEP_MAX_ROWS_CPU` rows per
    step). Groups are formed in grid order, and the largest is halved while there are
    fewer tasks than ``workers`` (no idle worker), so a killed group is formed again alike."""
    import torch

    from iwae.lockstep import stackable
    from iwae.rundir import CHECKPOINT_FILE, SUMMARY_FILE, checkpoint_meta
    from iwae.train import TrainConfig, lockstep_key, settle_group_checkpoint

    cuda = torch.cuda.is_available()
    groups: dict[tuple, list[Run]] = {}
    tasks: list[Task] = []
    for run in runs:
        d = out / "runs" / run.name
        settle_group_checkpoint(d)
        config = TrainConfig(**dict(run.config, data_dir=data_dir))
        meta = checkpoint_meta(d / CHECKPOINT_FILE)
        position = (
            (0, 0) if meta is None else (meta["progress"]["passes"], meta["progress"]["step"])
        )
        if (
            group_size < 2
            or run.after
            or (d / SUMMARY_FILE).exists()
            or not stackable(config)
            or not (cuda or config.rows_per_step < LOCKSTEP_MAX_ROWS_CPU)
        ):
            tasks.append((run,))
        else:
            groups.setdefault((lockstep_key(config), position), []).append(run)
    for members in groups.values():
        tasks += [tuple(members[i : i + group_size]) for i in range(0, len(members), group_size)]
    return _spread(tasks, workers)


def _spread(tasks: list[Task], workers: int) -> list[Task]:
    """``tasks`` with the largest group halved until there are ``workers`` tasks or no group."""
    while len(tasks) < workers and any(len(t) > 1 for t in tasks):
        largest = max(tasks, key=len)
        i, half = tasks.index(largest), (len(largest) + 1) // 2
        tasks[i : i + 1] = [largest[:half], largest[half:]]
    return tasks


def _ready(tasks: list[Task], done: set[str], started: set[str]) -> list[Task]:
    """Tasks not started whose runs' first stages are done, the most expensive first (fewer
    idle workers at the end)."""
    ready = [
        t
        for t in tasks
        if t[0].name not in started and all(r.after is None or r.after in done for r in t)
    ]
    return sorted(ready, key=lambda t: -sum(_cost(r) for r in t))


def _cost(run: Run) -> float:
    """A run's relative training cost: rows per step x stochastic layers, twice where the
    gradient takes two backward passes (the "split" route of
    :data:`iwae.bounds.GRADIENT_ROUTES`)."""
    from iwae.train import TrainConfig

    config = TrainConfig.from_dict(run.config)
    return (
        config.rows_per_step * config.layers * (2 if config.objective_spec.route == "split" else 1)
    )


# -- the loop -----------------------------------------------------------------------------------


class Executor(Protocol):
    """Where tasks run: a context manager that submits calls and waits for them."""

    def submit(self, fn: Callable, *args) -> Any:
        """Start ``fn(*args)``; returns a handle to wait on."""

    def wait_any(self, handles: Sequence) -> list:
        """Block until at least one of ``handles`` has finished; the finished ones."""

    def result(self, handle) -> Any:
        """What the call of a finished handle returned (re-raising what it raised)."""


def run_tasks(
    tasks: list[Task], executor: Executor, work: Callable[[Task], list[dict]], progress: bool
) -> list[dict]:
    """Run every task as ``work(task)`` (a list of statuses, one per run) on ``executor``, a
    task once the runs it continues are done; returns the statuses in the order the tasks
    finished. A progress line per finished task names its runs and the last one's status.
    A failed task raises here, once the executor has stopped the others."""
    results: list[dict] = []
    done: set[str] = set()
    started: set[str] = set()
    pending: dict[Any, Task] = {}
    total = sum(len(t) for t in tasks)
    with executor, progress_bar(total, "runs", "run", enabled=progress, interval=0) as bar:
        while len(done) < total:
            for task in _ready(tasks, done, started):
                pending[executor.submit(work, task)] = task
                started.update(r.name for r in task)
            for handle in executor.wait_any(list(pending)):
                task = pending.pop(handle)
                results += executor.result(handle)
                done.update(r.name for r in task)
                bar.set_postfix_str(
                    f"{'+'.join(r.name for r in task)}: {results[-1]['status']}", refresh=False
                )
                bar.update(len(task))
    return results


class LocalPool:
    """``workers`` processes on this machine (spawned: no state shared with this one)."""

    def __init__(self, workers: int):
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)  # after a failed task, once the others have finished

    def submit(self, fn: Callable, *args):
        return self.pool.submit(fn, *args)

    def wait_any(self, handles: Sequence) -> list:
        finished, _ = wait(handles, return_when=FIRST_COMPLETED)
        return list(finished)

    def result(self, handle):
        return handle.result()


class RayCluster:
    """Ray tasks of ``threads`` CPUs each, on the cluster of ``RAY_ADDRESS``, a running one,
    or else a local one started here."""

    def __init__(self, threads: int):
        try:
            import ray
        except ModuleNotFoundError:
            raise IwaeError("the ray backend needs Ray: pip install 'iwae[ray]'") from None
        if not ray.is_initialized():
            ray.init()
        self.ray, self.remote = ray, ray.remote(num_cpus=threads)(_call)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def submit(self, fn: Callable, *args):
        return self.remote.remote(fn, *args)

    def wait_any(self, handles: Sequence) -> list:
        finished, _ = self.ray.wait(list(handles), num_returns=1)
        return finished

    def result(self, handle):
        return self.ray.get(handle)


def _call(fn: Callable, *args):
    """``fn(*args)``, as a Ray remote function."""
    return fn(*args)
