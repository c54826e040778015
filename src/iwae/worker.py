"""What a worker does with one task of an experiment: train (or resume) its runs, alone or in
lockstep, and evaluate each.

:func:`iwae.experiments.reproduce` hands every task (:mod:`iwae.schedule`) to a worker
process or a Ray task as a :class:`Work`, which carries what all its tasks share: the
experiment directory, the data directory, torch threads, the evaluation asked for, the
training switches and the time at which training stops. :func:`run_one` and
:func:`run_group` do the same for one run or one lockstep group, given those settings one
by one. A finished run is skipped; an interrupted one resumes from its checkpoint. Each run
directory ends with ``evaluation.json``, ``activity.json`` (per-unit activity) and
``runner.json`` (wall times of training, by machine, and of evaluation).
"""

from __future__ import annotations

import contextlib
import platform
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from iwae import interrupts
from iwae.errors import Interrupted, TimeLimitReached, TrainingStopped
from iwae.grids import Run
from iwae.rundir import read_json
from iwae.runlock import locked

#: samples per test image of the evaluation that finishes every run (L_5000)
EVAL_K = 5000


@dataclass(frozen=True)
class Work:
    """What a worker does with one task (:func:`run_group`), and what every task of one
    :func:`iwae.experiments.reproduce` call shares: the experiment directory, the data
    directory, torch threads per run, the evaluation asked for, the training switches and
    the wall-clock time ``stop_at`` at which training stops. Picklable, for worker processes
    and Ray."""

    exp_dir: str
    data_dir: str | None
    threads: int
    eval_k: int = EVAL_K
    n_test: int | None = None
    flush_denormal: bool = True
    cuda_graphs: str = "auto"
    stop_at: float | None = None

    def __call__(self, task: tuple[Run, ...]) -> list[dict]:
        """The statuses of the task's runs; a stop signal (:mod:`iwae.interrupts`) ends it
        with its runs checkpointed ("interrupted")."""
        try:
            with interrupts.catching():
                return _run_group([asdict(r) for r in task], self)
        except Interrupted:
            return [{"name": r.name, "status": "interrupted"} for r in task]


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
    work = Work(exp_dir, data_dir, threads, eval_k, n_test, flush_denormal, cuda_graphs, stop_at)
    return _run_one(run, work)


def _run_one(run: dict, work: Work) -> dict:
    """:func:`run_one` with the settings ``work``."""
    from iwae.rundir import training_finished
    from iwae.train import time_limit_passed

    run, out = _worker_setup(run, work)
    if _evaluated(run, out, work):
        return {"name": run.name, "status": "skipped"}
    if time_limit_passed(work.stop_at):  # not started
        return _stopped([run])[0]
    with interrupts.catching(), locked(out):
        started, trained_before = time.perf_counter(), training_finished(out)
        try:
            _train_one(run, out, work, trained_before)
        except TrainingStopped as stop:
            return _stopped([run], [out], time.perf_counter() - started, _stop_status(stop))[0]
        if not trained_before:
            _record_training([out], time.perf_counter() - started)
        if interrupts.received() is not None:  # training ended as the signal came
            return {"name": run.name, "status": "interrupted"}
        return _evaluate_run(run, out, work)


def _train_one(run: Run, out: Path, work: Work, trained_before: bool) -> None:
    """Resume the run in ``out`` from its checkpoint (a finished one: nothing to do), or
    train it from the start (a second stage from its first stage's weights)."""
    from iwae.checkpoint import checkpoint_exists
    from iwae.train import TrainConfig, resume, train

    if checkpoint_exists(out):  # interrupted (or finished: then resume does nothing)
        resume(
            out,
            progress=False,
            cuda_graphs=work.cuda_graphs,
            data_dir=work.data_dir,
            stop_at=work.stop_at,
            fallback=True,
        )
    elif not trained_before:
        keys = dict(run.config, data_dir=work.data_dir)
        if run.after is not None:
            after = Path(work.exp_dir) / "runs" / run.after / "model.safetensors"
            keys["init_weights"] = str(after)
        train(
            TrainConfig(**keys),
            out,
            progress=False,
            overwrite=True,
            cuda_graphs=work.cuda_graphs,
            stop_at=work.stop_at,
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
    (:func:`iwae.schedule.plan_tasks`)."""
    work = Work(exp_dir, data_dir, threads, eval_k, n_test, flush_denormal, cuda_graphs, stop_at)
    return _run_group(runs, work)


def _run_group(runs: list[dict], work: Work) -> list[dict]:
    """:func:`run_group` with the settings ``work``."""
    from iwae.rundir import training_finished
    from iwae.train import time_limit_passed

    if len(runs) == 1:
        return [_run_one(runs[0], work)]
    members = [_worker_setup(r, work) for r in runs]
    outs = [out for _, out in members]
    if time_limit_passed(work.stop_at):  # not started
        return _stopped([run for run, _ in members])
    with interrupts.catching(), contextlib.ExitStack() as held:
        for out in outs:
            held.enter_context(locked(out))
        started = time.perf_counter()
        trained_before = all(training_finished(out) for out in outs)
        try:
            _train_group(members, work)
        except TrainingStopped as stop:
            train_s = time.perf_counter() - started
            return _stopped([run for run, _ in members], outs, train_s, _stop_status(stop))
        if not trained_before:
            _record_training(
                outs, time.perf_counter() - started, lockstep=[run.name for run, _ in members]
            )
        if interrupts.received() is not None:  # training ended as the signal came
            return [{"name": run.name, "status": "interrupted"} for run, _ in members]
        return [_evaluate_run(run, out, work) for run, out in members]


def _train_group(members: list[tuple[Run, Path]], work: Work) -> None:
    """Train the runs ``members`` (run, its directory) in lockstep: resumed where every one
    has a checkpoint (finished ones: nothing to do), else from the start."""
    from iwae.checkpoint import checkpoint_exists
    from iwae.train import TrainConfig, resume_config, train_lockstep

    outs = [out for _, out in members]
    if all(checkpoint_exists(out) for out in outs):
        configs = [resume_config(out, work.data_dir) for out in outs]
        start = dict(resume=True, fallback=True)
    else:
        configs = [TrainConfig(**dict(run.config, data_dir=work.data_dir)) for run, _ in members]
        start = dict(overwrite=True)
    train_lockstep(
        configs, outs, progress=False, cuda_graphs=work.cuda_graphs, stop_at=work.stop_at, **start
    )


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


def _worker_setup(run: dict, work: Work) -> tuple[Run, Path]:
    """Set this worker's torch threads and denormal flushing; the run and its directory."""
    import torch

    from iwae.train import flush_denormals

    torch.set_num_threads(work.threads)
    flush_denormals(work.flush_denormal)
    run = Run(**run)
    return run, Path(work.exp_dir) / "runs" / run.name


def _evaluated(run: Run, out: Path, work: Work) -> bool:
    """Whether the run in ``out`` has finished training (``summary.json``) and is evaluated
    as asked (:func:`_evaluated_as_asked`): an ``evaluation.json`` in a run still training
    (written there by ``iwae evaluate`` before it wrote unfinished runs' evaluations to
    ``stages/``) leaves it to resume."""
    from iwae import data as iwae_data
    from iwae.rundir import training_finished

    done = read_json(out / "evaluation.json", required=False)
    if not done or not training_finished(out):
        return False
    dataset = run.config["dataset"]
    full = iwae_data.TEST_SIZES.get(dataset) or iwae_data.load_dataset(dataset).test.shape[0]
    return _evaluated_as_asked(done, work.eval_k, work.n_test, full)


def _evaluate_run(run: Run, out: Path, work: Work) -> dict:
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
    dataset, n_test = iwae_data.load_dataset(config.dataset, work.data_dir), work.n_test
    x = torch.from_numpy(iwae_data.binarized_test(dataset, n_test))
    result, per_image = evaluate_images(model, x, k=work.eval_k, seed=0)
    result.update(iwae_data.test_subset_record(dataset.test.shape[0], n_test))
    activity = [a.tolist() for a in unit_activity(model, x)]
    timing.update(
        eval_wall_s=time.perf_counter() - started,
        threads=work.threads,
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
