"""Lockstep: a group of runs trained side by side in one process, as one stacked model.

The runs' models are copied into one stacked VAE (:meth:`iwae.model.VAE.stack`) with one
fused Adam over the stacked parameters: one batched forward and backward per step
(:class:`LockstepStep`). In the training loop (:mod:`iwae.engine`) the group's stepper is a
:class:`GroupStep`, which also stacks the runs' Adam moments on resumption and copies the
weights and moments back into each run's own model and optimizer before they are saved.
Runs can share a group when their :func:`lockstep_key` agree.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from iwae import data as iwae_data
from iwae.bounds import Objective, backward_stacked
from iwae.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_NEXT_FILE,
    checkpoint_meta,
    promote_checkpoint,
    recover_checkpoint,
)
from iwae.config import TrainConfig
from iwae.cudagraph import GraphedSteps
from iwae.engine import Group, say, train_group
from iwae.errors import IwaeError
from iwae.model import VAE
from iwae.optim import adam, learning_rate, set_lr, step_if_finite
from iwae.precision import step_context
from iwae.rundir import SUMMARY_FILE, prepare_run_dir, read_json, training_finished
from iwae.runlock import locked
from iwae.runs import Run, open_run

#: configuration keys that must agree for runs to share a lockstep group: the data, the
#: architecture, the samples drawn per example, the schedule, Adam's settings and the
#: precision of the steps (the objective, its estimator family aside, the seed and what is
#: logged may differ)
LOCKSTEP_KEYS = (
    "dataset",
    "validation",
    "n_train",
    "batch_size",
    "stages",
    "epochs",
    "lr",
    "beta1",
    "beta2",
    "adam_eps",
    "model",
    "init_weights",
    "binarize",
    "precision",
)


def stackable(config: TrainConfig) -> bool:
    """The run's model can be stacked with others (:meth:`iwae.model.VAE.stack`): Burda et
    al.'s MLP (not the conv architecture, nor a model handed to iwae.fit) whose likelihood
    has no parameters of its own (not a Gaussian with a learned scale)."""
    return (
        config.arch == "mlp"
        and not config.model_given_in_python
        and not (config.likelihood == "gaussian" and config.gaussian_scale == "learned")
    )


def lockstep_key(config: TrainConfig) -> tuple:
    """Runs with equal keys can be trained in lockstep (:func:`train_lockstep`)."""
    spec = config.objective_spec
    return (
        *(json.dumps(getattr(config, k), sort_keys=True) for k in LOCKSTEP_KEYS),
        spec.samples,
        spec.stops_q,
    )


def train_lockstep(
    configs: list[TrainConfig],
    outs: list,
    dataset: iwae_data.Dataset | None = None,
    progress: bool = True,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    cuda_graphs: str = "auto",
    stop_at: float | None = None,
    fallback: bool = False,
) -> list[dict]:
    """Train the runs ``configs`` in the run directories ``outs`` side by side in this
    process: one stacked model (:meth:`iwae.model.VAE.stack`), one fused Adam over the
    stacked parameters, one batched forward and backward per step.

    Each run keeps what makes it itself: its seed's initial weights, its generator (data
    order, binarization and samples, drawn exactly as the run alone draws them), its
    objective and estimator, its Adam moments, and its own complete run directory (config,
    metrics, weights, checkpoints, summary) readable and resumable as a single run's.
    The runs must share :func:`lockstep_key`. A step whose bound or gradient is not finite
    for any run is skipped for the whole group and counted in every run's skipped_steps.
    Checkpoints are written for all runs at once, in two phases
    (:func:`iwae.engine.group_checkpoint`), so that a killed group resumes (``resume=True``)
    bit for bit. ``stop_at`` and ``fallback``: as :func:`iwae.engine.train`'s (a run that
    falls back to an earlier step than the others stops the group: resume it alone). Holds
    every run directory's lock (:func:`iwae.runlock.locked`). Returns the summaries.
    """
    outs = [Path(o) for o in outs]
    if not all(stackable(c) for c in configs):
        raise IwaeError(
            "lockstep training stacks Burda et al.'s MLPs whose likelihood has no parameters of "
            "its own: train conv models, models of your own and Gaussians with a learned scale "
            "one by one"
        )
    if len({lockstep_key(c) for c in configs}) != 1:
        raise IwaeError(
            "runs trained in lockstep must share the data, architecture, samples per example, "
            "estimator family, schedule and Adam settings"
        )
    if not resume:
        for out in outs:  # their parents, before the locks make them
            if not out.is_dir():
                prepare_run_dir(out, overwrite)
    with contextlib.ExitStack() as held:
        for out in outs:
            held.enter_context(locked(out))
        if resume:
            for out in outs:
                settle_group_checkpoint(out)
                if fallback:
                    say(recover_checkpoint(out))
        if resume and all(training_finished(o) for o in outs):
            return [read_json(o / SUMMARY_FILE) for o in outs]
        runs = [
            open_run(c, o, dataset, overwrite, device, resume, cuda_graphs)
            for c, o in zip(configs, outs)
        ]
        if len({(r.state.passes, r.state.step) for r in runs}) != 1 or any(r.shard for r in runs):
            raise IwaeError(
                "runs resumed in lockstep must stand at the same step of their schedule (resume "
                "them one by one)"
            )
        if len({r.config.precision for r in runs}) != 1:
            raise IwaeError(
                "runs trained in lockstep must train in one precision, got "
                f"{', '.join(sorted({r.config.precision for r in runs}))}"
            )
        group = Group(runs, GroupStep(runs), two_phase=True, stop_at=stop_at)
        return train_group(group, progress)


class StackedNoise:
    """The noise of G runs side by side (a :data:`iwae.model.Noise`): model g's part of a
    [G, ...] draw comes from ``generators[g]``, in the order and shape the run alone draws it."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def __call__(self, shape, dtype, device) -> torch.Tensor:
        return torch.stack(
            [
                torch.randn(shape[1:], dtype=dtype, device=device, generator=g)
                for g in self.generators
            ]
        )


class LockstepStep:
    """The training step of G models side by side: ``models[g]`` (copied into one stacked
    VAE) with objective ``objectives[g]`` and noise from ``generators[g]``, one fused Adam
    over the stacked parameters. ``step(xb)`` with ``xb`` [G, B, D] is every model's
    :func:`iwae.optim.train_step` on its own batch ``xb[g]`` in one batched forward and
    backward, in ``precision`` (:func:`iwae.precision.step_context`)."""

    def __init__(
        self,
        models: list[VAE],
        objectives: list[Objective],
        generators: list[torch.Generator],
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-4,
        graphs: bool = False,
        precision: str = "fp32",
    ):
        if not all(type(m) is VAE for m in models):
            kinds = sorted({type(m).__name__ for m in models})
            raise IwaeError(
                f"lockstep training stacks models of iwae.model.VAE (Burda et al.'s MLPs) only; "
                f"{', '.join(kinds)} cannot be stacked: train these runs one by one "
                "(--no-lockstep)"
            )
        self.model = VAE.stack(models)
        self.optimizer = adam(self.model.parameters(), lr, betas, eps, capturable=graphs)
        self.objectives = objectives
        self.precision = precision
        self.stop_q = objectives[0].stops_q
        self.noise = StackedNoise(generators)
        self.params = (self.model.encoder_parameters(), self.model.decoder_parameters())
        self.graphed = None
        if graphs:  # the same steps replayed from CUDA graphs (:mod:`iwae.cudagraph`)
            device = self.model.output_layer.weight.device
            self.graphed = GraphedSteps(
                self._step, device, self.noise, capture=device.type == "cuda"
            )

    def step(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of every model on its batch ``xb[g]``: (bounds [G], skipped)."""
        return self._step(xb, self.noise) if self.graphed is None else self.graphed(xb)

    def _step(self, xb: torch.Tensor, noise) -> tuple[torch.Tensor, torch.Tensor]:
        enc, dec = self.params
        self.optimizer.zero_grad(set_to_none=True)
        with step_context(self.model, self.precision):
            log_w = self.model.log_weights(
                xb, self.objectives[0].samples, stop_q=self.stop_q, noise=noise
            )
        values = backward_stacked(self.objectives, log_w, enc, dec)
        return values, step_if_finite(self.optimizer, values, enc + dec)


class GroupStep(LockstepStep):
    """The stepper (:class:`iwae.steppers.Stepper`) of a lockstep group of open runs: the
    stacked step, and the copies to and from the runs' own models and optimizers."""

    def __init__(self, runs: list[Run]):
        c = runs[0].config
        super().__init__(
            [r.model for r in runs],
            [r.objective for r in runs],
            [r.generator for r in runs],
            c.lr,
            (c.beta1, c.beta2),
            c.adam_eps,
            graphs=runs[0].graphs,
            precision=c.precision,
        )
        self.runs = runs
        if runs[0].optimizer.state:  # resumed: the members' Adam moments, stacked
            self._stack_adam_state()

    @property
    def graph_failure(self) -> str | None:
        return getattr(self.graphed, "failed", None)

    def start_pass(self, lr: float) -> None:
        set_lr(self.optimizer, lr)
        self.model.train()

    def __call__(self, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(torch.stack(batches))

    def _pairs(self):
        """(name, stacked parameter, the members' parameters of that name)."""
        members = [dict(r.model.named_parameters()) for r in self.runs]
        for name, p in self.model.named_parameters():
            yield name, p, [m[name] for m in members]

    def _stack_adam_state(self) -> None:
        for name, p, ps in self._pairs():
            states = [r.optimizer.state[q] for r, q in zip(self.runs, ps)]
            self.optimizer.state[p] = {
                "step": states[0]["step"].clone(),
                **{
                    k: self.model.stacked_layout(name, [st[k] for st in states])
                    for k in ("exp_avg", "exp_avg_sq")
                },
            }

    def to_members(self) -> None:
        """Copy the stacked weights and Adam state into each member's own model and optimizer
        (before their test bounds, weights and checkpoints are written)."""
        layout = self.model.member_layout
        with torch.no_grad():
            for name, p, ps in self._pairs():
                state = self.optimizer.state.get(p)
                for g, (run, q) in enumerate(zip(self.runs, ps)):
                    q.copy_(layout(name, p, g))
                    if state:
                        run.optimizer.state[q] = {
                            "step": state["step"].clone(),
                            "exp_avg": layout(name, state["exp_avg"], g),
                            "exp_avg_sq": layout(name, state["exp_avg_sq"], g),
                        }
        for run in self.runs:
            set_lr(run.optimizer, learning_rate(self.optimizer))


def settle_group_checkpoint(out: str | Path) -> None:
    """Finish or undo a lockstep group's interrupted checkpoint write at run directory ``out``:
    if every run of the group has its next checkpoint written (or already in place), the
    next checkpoints replace the current ones; otherwise they are deleted (every run still
    has the previous common checkpoint)."""
    out = Path(out)
    meta = checkpoint_meta(out / CHECKPOINT_NEXT_FILE)
    if meta is None:
        (out / CHECKPOINT_NEXT_FILE).unlink(missing_ok=True)
        return
    position = (meta["progress"]["passes"], meta["progress"]["step"])
    members = [out / d for d in meta.get("group", ["."])]

    def ready(d: Path) -> bool:
        for name in (CHECKPOINT_NEXT_FILE, CHECKPOINT_FILE):
            m = checkpoint_meta(d / name)
            if m is not None and (m["progress"]["passes"], m["progress"]["step"]) == position:
                return True
        return False

    complete = all(ready(d) for d in members)
    for d in members:
        if (d / CHECKPOINT_NEXT_FILE).exists():
            if complete:  # the current checkpoint becomes the previous one
                promote_checkpoint(d / CHECKPOINT_NEXT_FILE)
            else:
                (d / CHECKPOINT_NEXT_FILE).unlink()
