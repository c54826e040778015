"""The training loop: one loop over passes and one over the steps of a pass, for a group of
runs trained side by side (a single run is the group of one).

How the group takes a step is its stepper (:class:`iwae.steppers.Stepper`): one run's
:func:`iwae.optim.train_step`, eager (:class:`iwae.steppers.EagerStep`; torchrun-sharded
where the run has a shard) or replayed from CUDA graphs (:class:`iwae.steppers.GraphedStep`),
or G runs' models stacked into one (:class:`iwae.lockstep.GroupStep`). The loop does the
rest once for all of them: the pass's data, the running sums and the non-finite guard, the
time limit (:class:`iwae.errors.TimeLimitReached`) and SIGINT/SIGTERM
(:class:`iwae.errors.Interrupted`: the step in progress ends, a checkpoint is written
there; :mod:`iwae.interrupts`), checkpoints (one file for a single run, two phases for a
lockstep group: :func:`group_checkpoint`), the metrics lines with the test bounds due, the
stage-end weights, and ``summary.json``. A write that fails (a full disk) stops training with an
:class:`iwae.errors.IwaeError` naming the file and the last good checkpoint
(:func:`write_failed`). :func:`train` holds the run directory's lock (:mod:`iwae.runlock`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from iwae import data as iwae_data
from iwae import interrupts
from iwae.bounds import Objective
from iwae.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_NEXT_FILE,
    Progress,
    promote_checkpoint,
    recover_checkpoint,
    resume_position,
    save_checkpoint,
)
from iwae.config import TrainConfig, resume_config
from iwae.distributed import barrier
from iwae.errors import Interrupted, IwaeError, TimeLimitReached, TrainingStopped
from iwae.latent import LatentVariableModel
from iwae.memory import reuse_freed_memory
from iwae.precision import summary_record
from iwae.rundir import (
    METRICS_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    prepare_run_dir,
    read_json,
    save_weights,
    training_finished,
    write_json,
)
from iwae.runlock import lead_process, locked
from iwae.runlog import log_pass, log_stage, pass_record, stage_bar, stage_nll, test_bounds
from iwae.runs import Run, open_run
from iwae.steppers import EagerStep, GraphedStep, Stepper

#: steps between host reads of the non-finite-step count (the count itself stays on the device)
GUARD_EVERY = 100


@dataclass
class Group:
    """Runs trained side by side by ``stepper`` (a single run: a group of one), standing at
    the same step of the same schedule. ``two_phase``: their checkpoints are written as a
    lockstep group's (:func:`group_checkpoint`); ``stop_at``: the wall-clock time
    (``time.time()``) at which training stops."""

    runs: list[Run]
    stepper: Stepper
    two_phase: bool = False
    stop_at: float | None = None
    last_checkpoint: float = field(default_factory=time.monotonic)

    @property
    def first(self) -> Run:
        return self.runs[0]

    def checkpoint(self, pass_start_rngs: list[torch.Tensor]) -> None:
        """Checkpoints of every run, with the generator states its unfinished pass started
        from (at a pass end: the current ones)."""
        if self.two_phase:
            group_checkpoint(self.runs, pass_start_rngs)
        else:
            (run,), (rng,) = self.runs, pass_start_rngs
            path = run.out / CHECKPOINT_FILE
            save_checkpoint(path, run.model, run.optimizer, run.generator, rng, run.state)
        self.last_checkpoint = time.monotonic()


def train(
    config: TrainConfig,
    out: str | Path,
    dataset: iwae_data.Dataset | None = None,
    progress: bool = True,
    overwrite: bool = False,
    device: str | None = None,
    resume: bool = False,
    cuda_graphs: str = "auto",
    stop_at: float | None = None,
    fallback: bool = False,
    model: LatentVariableModel | None = None,
    objective: Objective | None = None,
) -> dict:
    """Train a model as ``config`` says in the run directory ``out``, or with
    ``resume=True`` continue the run there from its checkpoint.

    ``model`` and ``objective``: a model and an objective of your own in place of the ones
    ``config`` names (:func:`iwae.fit`; ``model`` holds its initial weights, replaced by the
    checkpoint's when resumed).

    ``dataset`` may be given directly (tests use small synthetic sets); otherwise it
    is loaded from ``config.data_dir``. ``cuda_graphs``: "auto" replays each step from a
    CUDA graph on a (single-process) CUDA run, "off" never (:mod:`iwae.cudagraph`; the same
    numbers either way). ``stop_at``: a wall-clock time (``time.time()``) at which training
    stops, after the step or pass in progress, with a checkpoint (:class:`TimeLimitReached`);
    SIGINT and SIGTERM stop it alike (:class:`iwae.errors.Interrupted`). ``fallback``: a
    resumed run whose newest checkpoint is missing, unreadable or corrupt continues from the
    previous one, saying so on stderr (:func:`iwae.checkpoint.recover_checkpoint`); without it
    that is an error. Holds the lock of ``out`` (:func:`iwae.runlock.locked`) while it
    writes there. Returns the summary that is also written to ``summary.json``.
    """
    out = Path(out)
    if resume and training_finished(out):
        return read_json(out / SUMMARY_FILE)
    if not resume and lead_process() and not out.is_dir():
        prepare_run_dir(out, overwrite)  # its parents, before the lock makes it
    with locked(out, enabled=lead_process()):
        if resume and fallback and lead_process():
            say(recover_checkpoint(out))
        run = open_run(
            config, out, dataset, overwrite, device, resume, cuda_graphs, model, objective
        )
        if stop_at is not None and run.shard is not None:
            raise IwaeError(
                "--time-limit is not supported under torchrun (the processes would stop at "
                "different steps)"
            )
        stepper = GraphedStep(run) if run.graphs else EagerStep(run)
        return train_group(Group([run], stepper, stop_at=stop_at), progress)[0]


def resume(
    run_dir: str | Path,
    dataset=None,
    progress: bool = True,
    device: str | None = None,
    cuda_graphs: str = "auto",
    data_dir: str | None = None,
    stop_at: float | None = None,
    fallback: bool = False,
) -> dict:
    """Continue an interrupted run from its checkpoint (``iwae train --resume``); a run killed
    before its first checkpoint starts again from its ``config.json`` (the same weights, bit
    for bit, as a run never interrupted). ``data_dir``: where the data is now, if not where
    the run was trained (another machine); a file dataset is still checked by its hash.
    ``fallback``: from the previous checkpoint where the newest is bad (:func:`train`)."""
    return train(
        resume_config(run_dir, data_dir),
        run_dir,
        dataset=dataset,
        progress=progress,
        device=device,
        resume=True,
        cuda_graphs=cuda_graphs,
        stop_at=stop_at,
        fallback=fallback,
    )


def say(line: str | None) -> None:
    """``line`` on stderr, where there is one."""
    if line is not None:
        print(line, file=sys.stderr)


def train_group(group: Group, progress: bool) -> list[dict]:
    """The remaining passes of ``group``, each followed by its metrics lines, the stage-end
    weights and the checkpoints due; returns the runs' summaries. SIGINT and SIGTERM are
    deferred meanwhile (:func:`iwae.interrupts.deferred`): training stops at the step
    in progress, checkpointed. A failed write stops it too (:func:`write_failed`). On the
    CPU, the memory of each step's tensors is kept for the next
    (:func:`iwae.memory.reuse_freed_memory`)."""
    reuse_freed_memory(group.first.train_x.device)
    try:
        with interrupts.deferred():
            records = _train_passes(group, progress)
            return [_finish_run(r, record, group.stepper) for r, record in zip(group.runs, records)]
    except OSError as e:
        raise write_failed(group.runs, e) from e


def _train_passes(group: Group, progress: bool) -> list[dict]:
    """The remaining passes of ``group``; the metrics records of the last."""
    runs, first = group.runs, group.first
    bar, records = None, [{} for _ in runs]
    try:
        with contextlib.ExitStack() as files:
            metrics = [
                files.enter_context(open(r.out / METRICS_FILE if r.lead else os.devnull, "a"))
                for r in runs
            ]
            for p in range(first.state.passes, len(first.plan)):
                bar = _stage_bar(first, p, bar, progress)
                records = run_pass(group, p, bar)
                group.stepper.to_members()
                for run, record, f in zip(runs, records, metrics):
                    _record_pass(run, p, record, f)
                up = _time_up(group)
                if first.lead and (up or _checkpoint_due(group, p)):
                    group.checkpoint([r.generator.get_state() for r in runs])
                if up and p + 1 < len(first.plan):
                    raise _stopped(runs)
    finally:
        if bar is not None:
            bar.close()
        for run in runs:
            run.board.close()
    return records


def run_pass(group: Group, p: int, bar) -> list[dict]:
    """The steps of pass ``p`` (from the step the runs stand at when resumed mid-pass), with
    checkpoints every ``checkpoint_minutes``; returns the runs' metrics records."""
    runs, first, stepper = group.runs, group.first, group.stepper
    stage, lr = first.plan[p]
    t0 = time.perf_counter() - first.state.seconds  # the pass's clock counts its shuffle too
    stepper.start_pass(lr)
    batches = [pass_batches(r) for r in runs]
    bs = first.config.batch_size
    steps = math.ceil(first.train_x.shape[0] / bs)
    totals = PassTotals([r.state for r in runs], first.train_x.device)
    for step in range(first.state.step, steps):
        xbs = [b[step * bs : (step + 1) * bs] for b in batches]
        values, skipped = stepper(xbs)
        totals.add(values, skipped, xbs[0].shape[0])
        bar.update(1)
        if (step + 1) % GUARD_EVERY == 0 or step + 1 == steps:
            _stop_if_stuck(first, totals, p, step)
        up, due = _mid_pass_checkpoint(group)
        if first.lead and due and step + 1 < steps:
            stepper.to_members()
            totals.into([r.state for r in runs])
            seconds = time.perf_counter() - t0
            for run in runs:
                run.state.step, run.state.seconds = step + 1, seconds
            group.checkpoint([r.pass_start_rng for r in runs])
            if up:
                raise _stopped(runs)
    totals.into([r.state for r in runs])
    seconds = time.perf_counter() - t0
    return [pass_record(p, stage, lr, run.state, seconds) for run in runs]


def pass_batches(run: Run) -> torch.Tensor:
    """This pass's training batches: a random order of the images, each binarized afresh
    (pixel ~ Bernoulli(grey value); images already 0/1 are used as they are), drawn from
    the generator's state at the pass start."""
    generator, n = run.generator, run.train_x.shape[0]
    if run.state.step == 0:
        run.pass_start_rng = generator.get_state()
    current_rng = generator.get_state()
    generator.set_state(run.pass_start_rng)  # the pass's data comes from its starting state
    batches = run.train_x[torch.randperm(n, device=run.train_x.device, generator=generator)]
    if run.binarize:
        batches = torch.bernoulli(batches, generator=generator)
    if run.state.step > 0:
        generator.set_state(current_rng)  # resumed mid-pass: continue the sample stream
    return batches


class PassTotals:
    """The pass's running sums of a group's runs ([G] each), on the device: bound x examples
    over good steps, good examples, skipped steps, the current and the longest run of
    consecutive skipped steps."""

    def __init__(self, states: list[Progress], dev: torch.device):
        def t(field_, dtype=torch.float64):
            return torch.tensor(
                [float(getattr(st, field_)) for st in states], dtype=dtype, device=dev
            )

        self.bound_sum, self.good = t("bound_sum"), t("good_examples")
        self.skipped = t("skipped", torch.float32)
        self.consecutive = t("consecutive_bad", torch.float32)
        self.longest = self.consecutive.clone()

    def add(self, values: torch.Tensor, skipped: torch.Tensor, examples: int) -> None:
        """``values``: the batch-mean bound of each run ([G] or a scalar for one run);
        ``skipped``: 1.0 when the step was skipped (for every run), else 0.0."""
        self.bound_sum += torch.where(skipped > 0, 0.0, values.detach().double()) * examples
        self.good += (1.0 - skipped).double() * examples
        self.skipped += skipped
        self.consecutive.add_(skipped).mul_(skipped)
        torch.maximum(self.longest, self.consecutive, out=self.longest)

    def into(self, states: list[Progress]) -> None:
        sums, good = self.bound_sum.tolist(), self.good.tolist()
        skipped, consecutive = self.skipped.tolist(), self.consecutive.tolist()
        for g, st in enumerate(states):
            st.bound_sum, st.good_examples = sums[g], int(good[g])
            st.skipped, st.consecutive_bad = int(skipped[g]), int(consecutive[g])

    def stuck(self, max_bad_steps: int) -> bool:
        return bool((self.longest >= max_bad_steps).any())


def _stop_if_stuck(run: Run, totals: PassTotals, p: int, step: int) -> None:
    if totals.stuck(run.config.max_bad_steps):
        raise IwaeError(
            f"training stopped: at least {run.config.max_bad_steps} consecutive steps with a "
            f"non-finite bound or gradient (pass {p + 1}, by step {step + 1}); the last good "
            f"checkpoint is {run.out / CHECKPOINT_FILE}"
        )


def time_limit_passed(stop_at: float | None) -> bool:
    """The wall-clock time ``stop_at`` (``time.time()``; None: no limit) has passed."""
    return stop_at is not None and time.time() >= stop_at


def _time_up(group: Group) -> bool:
    """The group's time limit has passed (:func:`train`'s ``stop_at``), or a stop signal
    came (:func:`iwae.interrupts.received`)."""
    return time_limit_passed(group.stop_at) or interrupts.received() is not None


def _mid_pass_checkpoint(group: Group) -> tuple[bool, bool]:
    """(the time limit has passed, a checkpoint is due): at the limit, or when
    ``checkpoint_minutes`` have passed since the last checkpoint."""
    up = _time_up(group)
    minutes = group.first.config.checkpoint_minutes
    return up, up or time.monotonic() - group.last_checkpoint > minutes * 60


def _checkpoint_due(group: Group, p: int) -> bool:
    """A checkpoint is due after pass ``p``: it ends a stage, or ``checkpoint_minutes`` have
    passed since the last checkpoint."""
    minutes = group.first.config.checkpoint_minutes
    return p in group.first.stage_ends or time.monotonic() - group.last_checkpoint > minutes * 60


def _stopped(runs: list[Run]) -> TrainingStopped:
    """What stops the checkpointed ``runs``: a stop signal (:class:`Interrupted`), else the
    time limit (:class:`TimeLimitReached`), with one line saying where and how to go on."""
    s = runs[0].state
    where = f"pass {s.passes + 1}, step {s.step}" if s.step else f"the end of pass {s.passes}"
    names = ", ".join(str(r.out) for r in runs)
    tail = (
        f"{names} checkpointed at {where} of {len(runs[0].plan)}; "
        f"the same command (or iwae train --resume RUN) continues"
    )
    signum = interrupts.received()
    if signum is not None:
        return Interrupted(signum, f"interrupted by {interrupts.signal_name(signum)}: {tail}")
    return TimeLimitReached(f"time limit reached: {tail}")


def write_failed(runs: list[Run], error: OSError) -> IwaeError:
    """The error that stops ``runs`` when a write fails (``error``: a full disk, an I/O
    error, a permission): what failed, where, and the checkpoint the runs resume from,
    which the failed write left intact."""
    what = error.strerror or str(error)
    where = f" {error.filename}" if error.filename else f" in {runs[0].out}"
    position = resume_position(runs[0].out)
    if position is None:
        kept = "there is no checkpoint yet: --resume starts the run again from its config.json"
    else:
        passes, step = position
        at = f"pass {passes + 1}, step {step}" if step else f"the end of pass {passes}"
        kept = f"the last good checkpoint, at {at}, is intact"
    names = " ".join(str(r.out) for r in runs)
    return IwaeError(
        f"training stopped: cannot write{where} ({what}); {kept}; once the cause is fixed "
        f"(space freed), iwae train --resume {names} (or the same reproduce command) continues"
    )


def group_checkpoint(runs: list[Run], pass_start_rngs: list[torch.Tensor]) -> None:
    """Checkpoints of every run of a lockstep group, in two phases: each run's new checkpoint
    goes to ``checkpoint.next.safetensors`` (naming the group), and only when all are written
    do they replace the current ones. :func:`iwae.lockstep.settle_group_checkpoint` finishes
    or undoes an interrupted write, so that the runs of a group always resume from one
    common step."""
    for run, rng in zip(runs, pass_start_rngs):
        # relative: the directories may move
        group = [os.path.relpath(r.out, run.out) for r in runs]
        path = run.out / CHECKPOINT_NEXT_FILE
        save_checkpoint(path, run.model, run.optimizer, run.generator, rng, run.state, group)
    for run in runs:  # each current checkpoint becomes the previous one
        promote_checkpoint(run.out / CHECKPOINT_NEXT_FILE)


def _stage_bar(run: Run, p: int, bar, enabled: bool):
    """The progress bar of pass ``p``'s stage: a new one when a stage starts."""
    stage, lr = run.plan[p]
    if bar is not None and not (run.state.step == 0 and run.plan[p - 1][0] != stage):
        return bar
    if bar is not None:
        bar.close()
    remaining = sum(1 for q in range(p, len(run.plan)) if run.plan[q][0] == stage)
    steps = math.ceil(run.train_x.shape[0] / run.config.batch_size)
    total = remaining * steps - run.state.step
    return stage_bar(total, enabled and run.lead, run.config, run.objective, stage, lr)


def _record_pass(run: Run, p: int, record: dict, metrics) -> None:
    """The test bounds due after pass ``p``, its metrics line, and at a stage end the weights."""
    config, stage_end = run.config, p in run.stage_ends
    if run.lead and ((p + 1) % config.eval_every == 0 or stage_end):
        record.update(test_bounds(run.model, run.test_x, config.curve_k, seed=p + 1))
    if run.lead and stage_end and config.stage_nll_k:
        record.update(stage_nll(run.model, run.test_x, config.stage_nll_k, seed=p + 1))
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    log_pass(run.board, record)
    run.state = Progress(
        p + 1,
        consecutive_bad=run.state.consecutive_bad,
        total_seconds=run.state.total_seconds + record["seconds"],
    )
    if run.lead and stage_end:
        save_weights(run.model, run.out / WEIGHTS_FILE, passes=p + 1)
        log_stage(run.board, run.model, run.test_x, p + 1, run.config.image_shape)


def _finish_run(run: Run, record: dict, stepper: Stepper) -> dict:
    """``summary.json``, written last: the run is finished."""
    dev = run.train_x.device
    summary = {
        "passes": len(run.plan),
        "train_seconds": run.state.total_seconds,
        "final_train_bound": record.get("train_bound"),
        "final_test_iwae64": record.get("test_iwae64"),
        "test_iwae64_n": int(run.test_x.shape[0]),
        "n_train": int(run.train_x.shape[0]),
        "device": str(dev),
        "processes": 1 if run.shard is None else run.shard[1],
        "torch_threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "cuda_graphs": run.graphs and stepper.graph_failure is None,
        "torch": torch.__version__,
        **summary_record(run.config, run.precision_measured),
    }
    if stepper.graph_failure is not None:  # the steps ran eagerly: say why
        summary["cuda_graph_failure"] = stepper.graph_failure
    if run.lead:
        write_json(run.out / SUMMARY_FILE, summary)
    barrier(run.shard)
    return summary
