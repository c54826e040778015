"""A training step replayed as one CUDA graph: no host work between its kernels.

At the papers' batch of 20 a training step of these models is a few hundred small
kernels (forward, backward, the finite check, Adam); on a GPU the host's launching of
them, not the GPU's arithmetic, sets the pace. :class:`GraphedStep` records a whole step
once (``torch.cuda.graph``) and then replays it with one launch per step.

What a captured step needs, and how it gets it:

* **Static inputs.** A graph reads fixed addresses. The batch is copied into a fixed
  tensor before each replay; the reparameterization noise is drawn *eagerly*, before each
  replay, into fixed tensors (:class:`ReplayedNoise`), by the run's own source of noise,
  in the order and the shapes the eager step draws it. So a graphed run consumes its
  generator exactly as an eager run does: the same samples, and the same generator state
  in checkpoints (a graphed run resumes eagerly, and an eager run graphed, unchanged).
* **No host syncs.** The non-finite guard is on the device (the fused Adam reads the
  skip flag as ``found_inf``, :func:`iwae.train.train_step`); Adam is built with
  ``capturable=True`` and its learning rate is a device tensor, changed in place at each
  stage (:func:`iwae.train.set_lr`).
* **Warm-up.** Autograd and the GPU libraries initialize lazily, so the step runs a few
  times before the capture (on a side stream, as ``torch.cuda.graph`` requires). The
  warm-up steps see a batch of NaNs: each is a skipped step, which leaves the weights,
  Adam's moments and its step count exactly as they were.

Only full batches of one shape are replayed; a smaller last batch of a pass takes the
eager step. Without CUDA the same object runs the step eagerly on its static buffers
(``capture=False``): that is how the buffering is tested on a CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

#: a noise source, as :data:`iwae.model.Noise`: (shape, dtype, device) -> standard normal draws
Noise = Callable[[tuple, torch.dtype, torch.device], Tensor]

#: one training step on a batch with a given noise source: -> (bound(s), skipped), on the device
StepBody = Callable[[Tensor, Noise], tuple[Tensor, Tensor]]

#: warm-up steps before the capture (the PyTorch documentation's examples use 3)
WARMUP_STEPS = 3


class ReplayedNoise:
    """A :data:`Noise` served from fixed tensors, in the order it is asked for.

    The first pass through a step records the shapes asked for (and serves zeros);
    :meth:`freeze` ends the recording. Before each later pass, :meth:`refill` draws every
    tensor from ``source``, eagerly and in the recorded order, and rewinds; the step then
    gets those tensors, at the same addresses every time (what a CUDA graph reads).
    """

    def __init__(self, source: Noise):
        self.source = source
        self.buffers: list[Tensor] = []
        self.frozen = False
        self.cursor = 0

    def __call__(self, shape, dtype, device) -> Tensor:
        if not self.frozen:
            self.buffers.append(torch.zeros(tuple(shape), dtype=dtype, device=device))
            return self.buffers[-1]
        if self.cursor >= len(self.buffers) or tuple(self.buffers[self.cursor].shape) != tuple(
            shape
        ):
            raise RuntimeError(
                f"a replayed step asked for noise {tuple(shape)} out of the recorded order "
                f"{[tuple(b.shape) for b in self.buffers]}"
            )
        self.cursor += 1
        return self.buffers[self.cursor - 1]

    def freeze(self) -> None:
        self.frozen, self.cursor = True, 0

    def rewind(self) -> None:
        self.cursor = 0

    def refill(self) -> None:
        """Draw every buffer afresh from ``source`` (eagerly) and rewind."""
        for buf in self.buffers:
            buf.copy_(self.source(tuple(buf.shape), buf.dtype, buf.device))
        self.cursor = 0


class GraphedStep:
    """``body`` (one optimizer step) on a static batch of shape ``x_shape``, captured as a
    CUDA graph (``capture=True``, CUDA only) and replayed by calling this object.

    ``body(x, noise)`` must do all its work on the device without host syncs, step the
    optimizer unless the step is skipped, and return (bound(s), skipped) tensors. Calling
    ``step(xb)`` copies ``xb`` into the static batch, draws the step's noise from
    ``noise_source`` and runs the step; the tensors it returns are overwritten by the
    next call (read or copy them before that).
    """

    def __init__(
        self,
        body: StepBody,
        x_shape: tuple,
        device: torch.device,
        noise_source: Noise,
        capture: bool = True,
        warmup: int = WARMUP_STEPS,
    ):
        device = torch.device(device)
        self.body = body
        self.x = torch.full(tuple(x_shape), float("nan"), device=device)
        self.noise = ReplayedNoise(noise_source)
        self._warm_up(device, warmup)
        self.graph, self.outputs = None, None
        if capture:
            self._capture()

    def _warm_up(self, device: torch.device, steps: int) -> None:
        """Run ``body`` on the NaN batch (skipped steps: nothing changes) to record the noise
        shapes and let lazy initialization happen before any capture."""
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side) if side is not None else nullcontext():
            for i in range(max(steps, 1)):
                self.noise.rewind()
                self.body(self.x, self.noise)
                if i == 0:
                    self.noise.freeze()
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)

    def _capture(self) -> None:
        if self.x.device.type != "cuda":
            raise RuntimeError(f"a CUDA graph needs a CUDA device, not {self.x.device}")
        self.graph = torch.cuda.CUDAGraph()
        self.noise.rewind()
        with torch.cuda.graph(self.graph):
            self.outputs = self.body(self.x, self.noise)

    def __call__(self, xb: Tensor) -> tuple[Tensor, Tensor]:
        self.x.copy_(xb)
        self.noise.refill()
        if self.graph is None:
            return self.body(self.x, self.noise)
        self.graph.replay()
        return self.outputs


class GraphedSteps:
    """:class:`GraphedStep` of ``body`` for every batch shape it is called with (captured at
    the first call of each shape: the full batches, and a pass's smaller last batch).

    Should a capture fail (a torch or driver that cannot capture some operation of the
    step), the steps run eagerly from then on, with a warning: a capture only records work
    and the warm-up steps change nothing, so the run continues exactly where it was."""

    def __init__(
        self, body: StepBody, device: torch.device, noise_source: Noise, capture: bool = True
    ):
        self.body, self.device, self.noise_source, self.capture = (
            body,
            torch.device(device),
            noise_source,
            capture,
        )
        self.steps: dict[tuple, GraphedStep] = {}
        self.failed: str | None = None

    def __call__(self, xb: Tensor) -> tuple[Tensor, Tensor]:
        shape = tuple(xb.shape)
        if self.failed is not None:
            return self.body(xb, self.noise_source)
        if shape not in self.steps:
            try:
                self.steps[shape] = GraphedStep(
                    self.body, shape, self.device, self.noise_source, self.capture
                )
            except RuntimeError as e:
                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"CUDA graph capture failed, training steps run eagerly ({self.failed})",
                    stacklevel=2,
                )
                return self.body(xb, self.noise_source)
        return self.steps[shape](xb)
