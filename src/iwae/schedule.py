"""Scheduling an experiment's runs: tasks (lockstep groups and single runs), and the one
loop that hands them to an executor, a local process pool or a Ray cluster.

A task is a tuple of :class:`iwae.grids.Run` trained together (:func:`plan_tasks`). The
loop (:func:`run_tasks`) submits every task whose runs' first stages are done, the most
expensive first, waits for any one to finish, records its statuses and submits what became
ready, until every run is done. An executor (:class:`LocalPool`, :class:`RayCluster`) only
submits a call, waits for the first of several to finish, and passes a stop signal on. A
task whose process dies is run again from its runs' checkpoints, a bounded number of
times; SIGINT and SIGTERM stop the loop once the tasks in progress have checkpointed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from iwae import interrupts
from iwae.errors import Interrupted, IwaeError
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

    from iwae.checkpoint import resume_position
    from iwae.lockstep import stackable
    from iwae.rundir import training_finished
    from iwae.train import TrainConfig, lockstep_key, settle_group_checkpoint

    cuda = torch.cuda.is_available()
    groups: dict[tuple, list[Run]] = {}
    tasks: list[Task] = []
    for run in runs:
        d = out / "runs" / run.name
        settle_group_checkpoint(d)
        config = TrainConfig(**dict(run.config, data_dir=data_dir))
        position = resume_position(d) or (0, 0)
        if (
            group_size < 2
            or run.after
            or training_finished(d)
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

#: seconds an executor waits for a task to finish before the loop looks for a stop signal
POLL_SECONDS = 0.5


class Executor(Protocol):
    """Where tasks run: a context manager that submits calls and waits for them. It may
    also have ``interrupt(signum, handles)``, which passes a stop signal on to the calls of
    ``handles`` in progress (:class:`LocalPool`, :class:`RayCluster`)."""

    def submit(self, fn: Callable, *args) -> Any:
        """Start ``fn(*args)``; returns a handle to wait on."""

    def wait_any(self, handles: Sequence) -> list:
        """The handles among ``handles`` that have finished, after waiting for at least one
        for at most a short while (:data:`POLL_SECONDS`; possibly none)."""

    def result(self, handle) -> Any:
        """What the call of a finished handle returned (re-raising what it raised; a call
        whose process died raises, e.g. :class:`WorkerDied`)."""


def run_tasks(
    tasks: list[Task],
    executor: Executor,
    work: Callable[[Task], list[dict]],
    progress: bool,
    max_retries: int = 0,
) -> list[dict]:
    """Run every task as ``work(task)`` (a list of statuses, one per run) on ``executor``, a
    task once the runs it continues are done; returns the statuses in the order the tasks
    finished. A progress line per finished task names its runs and the last one's status.

    A task whose call fails (its process killed, or an exception other than an
    :class:`iwae.errors.IwaeError`) is submitted again, up to ``max_retries`` times; its
    runs resume from their checkpoints. Then, or at once for an ``IwaeError`` (which a
    retry would meet again), its runs get the status "failed after N retries: REASON" (or
    "failed: REASON"), and every other task still runs. SIGINT or SIGTERM (recorded,
    :func:`iwae.interrupts.deferred`) is passed on to the tasks in progress, which
    checkpoint their runs and return; no task is started after it, and once the others
    have returned :class:`iwae.errors.Interrupted` is raised with every status so far (its
    ``results``; runs not started: "interrupted")."""
    results: list[dict] = []
    done: set[str] = set()
    started: set[str] = set()
    pending: dict[Any, Task] = {}
    attempts: dict[tuple[str, ...], int] = {}  # by the runs' names
    total, stopping = sum(len(t) for t in tasks), False
    with (
        executor,
        interrupts.deferred(),
        progress_bar(total, "runs", "run", enabled=progress, interval=0) as bar,
    ):
        while len(done) < total and (pending or not stopping):
            if interrupts.received() is not None and not stopping:
                stopping = True
                getattr(executor, "interrupt", lambda *_: None)(interrupts.received(), pending)
            for task in _orphans(tasks, results, started):
                orphaned = [
                    _status(r, f"failed: it continues {r.after}, which failed") for r in task
                ]
                _finished(task, orphaned, results, done, bar)
            for task in [] if stopping else _ready(tasks, done, started):
                pending[executor.submit(work, task)] = task
                started.update(r.name for r in task)
                attempts[_names(task)] = 1
            for handle in executor.wait_any(list(pending)):
                task = pending.pop(handle)
                attempt = attempts[_names(task)]
                statuses = _outcome(executor, handle, task, attempt, max_retries, stopping)
                if statuses is None:  # failed: again
                    pending[executor.submit(work, task)] = task
                    attempts[_names(task)] += 1
                else:
                    _finished(task, statuses, results, done, bar)
    if stopping:
        results += [_status(r, "interrupted") for t in tasks for r in t if r.name not in done]
        raise _interrupted(interrupts.received(), results)
    return results


def _finished(task: Task, statuses: list[dict], results: list[dict], done: set[str], bar) -> None:
    """Record the ``statuses`` of a finished ``task``'s runs, with a progress line."""
    results += statuses
    done.update(r.name for r in task)
    bar.set_postfix_str(
        f"{'+'.join(r.name for r in task)}: {statuses[-1]['status']}", refresh=False
    )
    bar.update(len(task))


def _orphans(tasks: list[Task], results: list[dict], started: set[str]) -> list[Task]:
    """Tasks not started that continue a run that failed (marked started here)."""
    failed = {r["name"] for r in results if r["status"].startswith("failed")}
    orphans = [t for t in tasks if t[0].name not in started and any(r.after in failed for r in t)]
    started.update(r.name for t in orphans for r in t)
    return orphans


def _outcome(
    executor: Executor, handle, task: Task, attempt: int, max_retries: int, stopping: bool
) -> list[dict] | None:
    """The statuses of a finished task's runs (with ``attempts`` where it took more than
    one call), or None where it failed and is to run again (its ``attempt``-th call, at
    most ``max_retries`` + 1; none once stopping)."""
    try:
        statuses = executor.result(handle)
        return statuses if attempt == 1 else [{**r, "attempts": attempt} for r in statuses]
    except IwaeError as e:
        reason = f"failed: {e}"
    except Exception as e:  # its process died, or a bug
        if stopping:
            return [_status(r, "interrupted") for r in task]
        if attempt <= max_retries:
            print(
                f"iwae reproduce: {'+'.join(r.name for r in task)} failed ({_reason(e)}); "
                f"retry {attempt} of {max_retries} from its checkpoint",
                file=sys.stderr,
            )
            return None
        reason = f"failed after {attempt - 1} retries: {_reason(e)}"
    return [{**_status(r, reason), "attempts": attempt} for r in task]


def _reason(error: Exception) -> str:
    """One line on why a call failed."""
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _names(task: Task) -> tuple[str, ...]:
    return tuple(r.name for r in task)


def _status(run: Run, status: str) -> dict:
    return {"name": run.name, "status": status}


def _interrupted(signum: int, results: list[dict]) -> Interrupted:
    """The stop of the loop by ``signum``, with the runs' statuses (``results``) and one
    line: the signal, what became of the runs, and how to continue."""
    counts = Counter(r["status"] for r in results)
    stop = Interrupted(
        signum,
        f"interrupted by {interrupts.signal_name(signum)}: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        + "; the runs in training were checkpointed: the same command continues",
    )
    stop.results = results
    return stop


class WorkerDied(Exception):
    """A worker process ended while it ran a task (killed by a signal, or crashed)."""


class _Job:
    """A call submitted to a :class:`LocalPool`: queued, running on a worker, or finished
    with an ``outcome`` ("ok" and the value, or "error" and the exception)."""

    def __init__(self, fn: Callable, args: tuple):
        self.call = (fn, args)
        self.worker = None
        self.outcome: tuple[str, Any] | None = None


class _Worker:
    """A spawned process that runs the calls sent down its pipe one at a time
    (:func:`_worker_main`)."""

    def __init__(self, context):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def collect(self) -> tuple[str, Any]:
        """The outcome of the call it ran (its process has ended: :class:`WorkerDied`)."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            code = self.process.exitcode
            how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit {code}"
            return "error", WorkerDied(f"worker process {self.process.pid} died ({how})")

    def stop(self, timeout: float) -> None:
        """Ask it to end after its call, wait up to ``timeout`` s, then kill it."""
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _worker_main(conn) -> None:
    """A worker's loop: a call (fn, args) in, ("ok", value) or ("error", exception) out,
    until None. SIGINT is ignored between calls (the runner passes signals on); a call's
    own handlers (:func:`iwae.interrupts.catching`) take it while the call runs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            call = conn.recv()
        except EOFError:
            return
        if call is None:
            return
        fn, args = call
        try:
            outcome = ("ok", fn(*args))
        except BaseException as e:
            text = "".join(traceback.format_exception(e))
            outcome = ("error", e if _picklable(e) else RuntimeError(text))
        conn.send(outcome)


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


class LocalPool:
    """``workers`` processes on this machine (spawned: no state shared with this one), each
    running one call at a time; calls beyond them wait in a queue. A worker that dies (a
    kill, a crash) is replaced, and its call's result raises :class:`WorkerDied`.
    :meth:`interrupt` passes a signal on to the workers with a call in progress. On exit
    every worker is ended and waited for: none is left behind."""

    def __init__(self, workers: int):
        self.size = workers
        self.context = multiprocessing.get_context("spawn")
        self.idle: list[_Worker] = []
        self.running: dict[_Job, _Worker] = {}
        self.queue: deque[_Job] = deque()

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # the loop failed: stop the calls in progress
            self.interrupt(signal.SIGTERM, list(self.running))
        for worker in self.idle + list(self.running.values()):
            worker.stop(timeout=5 if exc[0] is None else 120)
        self.idle.clear()
        self.running.clear()

    def submit(self, fn: Callable, *args) -> _Job:
        job = _Job(fn, args)
        self.queue.append(job)
        self._start_queued()
        return job

    def _start_queued(self) -> None:
        while self.queue and (self.idle or len(self.running) < self.size):
            worker = self.idle.pop() if self.idle else _Worker(self.context)
            job = self.queue.popleft()
            job.worker = worker
            worker.conn.send(job.call)
            self.running[job] = worker

    def wait_any(self, handles: Sequence) -> list:
        finished = [job for job in handles if job.outcome is not None]
        watched = {}
        for job in handles:
            worker = self.running.get(job)
            if worker is not None and job.outcome is None:
                watched[worker.conn] = watched[worker.process.sentinel] = job
        if not finished and watched:
            for ready in multiprocessing.connection.wait(list(watched), POLL_SECONDS):
                job = watched[ready]
                if job.outcome is None:
                    self._finish(job)
                    finished.append(job)
        self._start_queued()
        return finished

    def _finish(self, job: _Job) -> None:
        worker = self.running.pop(job)
        job.outcome = worker.collect()
        if worker.process.is_alive():
            self.idle.append(worker)
        else:
            worker.conn.close()

    def result(self, handle: _Job):
        kind, value = handle.outcome
        if kind == "error":
            raise value
        return value

    def interrupt(self, signum: int, handles) -> None:
        """Send ``signum`` to the workers running calls (each checkpoints and returns)."""
        for worker in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid, signum)


class RayCluster:
    """Ray tasks of ``threads`` CPUs each, on the cluster of ``RAY_ADDRESS``, a running one,
    or else a local one started here. Ray retries no task itself (``max_retries=0``): the
    loop does (:func:`run_tasks`). :meth:`interrupt` cancels the tasks in progress
    (``ray.cancel``: a SIGINT in the task, which checkpoints its runs)."""

    def __init__(self, threads: int):
        try:
            import ray
        except ModuleNotFoundError:
            raise IwaeError("the ray backend needs Ray: pip install 'iwae[ray]'") from None
        if not ray.is_initialized():
            ray.init()
        self.ray, self.remote = ray, ray.remote(num_cpus=threads, max_retries=0)(_call)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def submit(self, fn: Callable, *args):
        return self.remote.remote(fn, *args)

    def wait_any(self, handles: Sequence) -> list:
        finished, _ = self.ray.wait(list(handles), num_returns=1, timeout=POLL_SECONDS)
        return finished

    def result(self, handle):
        return self.ray.get(handle)

    def interrupt(self, signum: int, handles) -> None:
        for handle in handles:
            self.ray.cancel(handle)


def _call(fn: Callable, *args):
    """``fn(*args)``, as a Ray remote function."""
    return fn(*args)
