"""How a training loop's group of runs takes a step: its *stepper* (:class:`Stepper`).

:class:`EagerStep` is one run's :func:`iwae.optim.train_step` (torchrun-sharded where the
run has a shard), :class:`GraphedStep` the same step replayed from CUDA graphs; a lockstep
group's stepper is :class:`iwae.lockstep.GroupStep`. The loop that calls them is
:func:`iwae.engine.train_group`. To replace the step a test's ``monkeypatch.setattr``
sets it here (``iwae.steppers.train_step``), in the module that calls it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from iwae.cudagraph import GraphedSteps
from iwae.optim import set_lr, train_step
from iwae.precision import step_context
from iwae.runs import Run

__all__ = ["EagerStep", "GraphedStep", "Stepper"]


class Stepper(Protocol):
    """How a group's runs take a training step."""

    def start_pass(self, lr: float) -> None:
        """Set the learning rate ``lr`` and put the model(s) in training mode."""

    def __call__(self, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of each run g on its batch ``batches[g]`` [B, D]: (its batch-mean bound,
        0-dim or [G]; skipped, a 0-dim 0/1 tensor for the whole group)."""

    def to_members(self) -> None:
        """Bring the runs' own models and optimizers up to date (before they are saved)."""

    @property
    def graph_failure(self) -> str | None:
        """Why the CUDA-graph capture failed (the steps then ran eagerly), else None."""


class EagerStep:
    """The step of one run: :func:`iwae.optim.train_step` on its model, with its generator's
    noise, in the run's precision (:func:`iwae.precision.step_context`); data parallel
    (:mod:`iwae.distributed`) where the run has a torchrun shard."""

    graph_failure = None

    def __init__(self, run: Run):
        self.run = run
        self.params = None

    def start_pass(self, lr: float) -> None:
        set_lr(self.run.optimizer, lr)
        self.run.model.train()
        self.params = self.run.model.encoder_parameters(), self.run.model.decoder_parameters()

    def __call__(self, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        (xb,) = batches
        run = self.run
        with step_context(run.model, run.config.precision):
            return train_step(
                run.model, run.objective, run.optimizer, xb, run.generator, self.params, run.shard
            )

    def to_members(self) -> None:
        pass


class GraphedStep(EagerStep):
    """The step of :class:`EagerStep` replayed from CUDA graphs, one per batch shape, with
    the same noise drawn from the same generator (:class:`iwae.cudagraph.GraphedSteps`)."""

    def __init__(self, run: Run):
        super().__init__(run)
        device = run.train_x.device
        self.steps = GraphedSteps(
            self._body, device, _generator_noise(run.generator), device.type == "cuda"
        )

    def _body(self, x: torch.Tensor, noise) -> tuple[torch.Tensor, torch.Tensor]:
        run = self.run
        with step_context(run.model, run.config.precision):
            return train_step(
                run.model, run.objective, run.optimizer, x, params=self.params, noise=noise
            )

    def __call__(self, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        (xb,) = batches
        return self.steps(xb)

    @property
    def graph_failure(self) -> str | None:
        return self.steps.failed


def _generator_noise(generator: torch.Generator):
    """The noise a step draws with ``generator`` (as :meth:`iwae.model.GaussianLayer.rsample`
    does), as a :data:`iwae.model.Noise`."""

    def draw(shape, dtype, device) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)

    return draw
