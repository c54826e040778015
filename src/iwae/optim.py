"""The optimizer and the training step: Burda et al.'s Adam (fused where torch allows) and
one step of it on a batch, skipped on the device when the bound or a gradient is not finite.
"""

from __future__ import annotations

import torch

from iwae.bounds import Objective
from iwae.distributed import sharded_backward
from iwae.model import VAE


def adam(
    params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-4, capturable: bool = False
) -> torch.optim.Adam:
    """Adam, fused into one kernel where this torch supports it for the parameters' device
    (CPU from torch 2.4): 1.2x faster training steps at batch 20, k=5 (bench/README.md).

    ``capturable=True`` (CUDA, for a step captured as a CUDA graph: :mod:`iwae.cudagraph`):
    fused and capturable, with the learning rate a device tensor (:func:`set_lr` changes it
    in place), so that a replayed step reads the current rate."""
    params = list(params)
    if capturable:
        lr_tensor = torch.tensor(float(lr), dtype=torch.float32, device=params[0].device)
        return torch.optim.Adam(
            params, lr=lr_tensor, betas=betas, eps=eps, fused=True, capturable=True
        )
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


def set_lr(optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr``: in place where it is a tensor
    (a capturable Adam, whose captured steps read that tensor)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def learning_rate(optimizer) -> float:
    """The learning rate of the first parameter group, as a float."""
    lr = optimizer.param_groups[0]["lr"]
    return float(lr) if isinstance(lr, torch.Tensor) else lr


def train_step(
    model: VAE,
    objective: Objective,
    optimizer,
    x: torch.Tensor,
    generator=None,
    params=None,
    shard: tuple[int, int] | None = None,
    noise=None,
):
    """One optimizer step on the batch ``x``; skipped if the bound or a gradient is not finite.

    Returns (batch-mean bound, skipped), both 0-dim tensors on the model's device; skipped
    is 1.0 for a skipped step, else 0.0. The check stays on the device (no host sync): the
    fused Adam of :func:`adam` takes it as ``found_inf`` and then leaves the weights, its
    moments and its step count as they were (:func:`step_if_finite`). ``params`` is the pair
    (encoder parameters, decoder parameters); pass it to avoid rebuilding the lists.
    ``noise``: an explicit source of the samples' noise (:data:`iwae.model.Noise`) in place
    of ``generator`` (a CUDA graph's static noise, :class:`iwae.cudagraph.ReplayedNoise`).

    With ``shard = (rank, world_size)`` (data parallel, under torchrun) every process
    gets the whole batch ``x`` and the same ``generator``, computes the examples
    rank, rank + world_size, ... with the noise one process would have drawn for them
    (:class:`iwae.model.BatchShard`), and the gradients, weighted by each share of the
    batch, are summed over processes in one all-reduce: the step is the single-process
    step up to the order of floating-point sums (:func:`iwae.distributed.sharded_backward`).
    """
    enc, dec = params or (model.encoder_parameters(), model.decoder_parameters())
    optimizer.zero_grad(set_to_none=True)
    if shard is None:
        value = objective.backward(
            objective.log_weights(model, x, generator, noise=noise), enc, dec
        )
    else:
        value = sharded_backward(model, objective, x, generator, enc, dec, *shard)
    return value, step_if_finite(optimizer, value, enc + dec)


def step_if_finite(optimizer, value: torch.Tensor, params: list) -> torch.Tensor:
    """``optimizer.step()`` unless ``value`` or a gradient of ``params`` is not finite;
    returns skipped, a 0-dim 0/1 tensor on the device. A fused Adam reads it on the device
    as ``found_inf``, as under ``torch.amp.GradScaler``; any other optimizer on the host."""
    check = torch.stack([value.sum(), *(p.grad.sum() for p in params if p.grad is not None)]).sum()
    skipped = (~torch.isfinite(check)).to(torch.float32)
    _step_unless(optimizer, skipped)
    return skipped


def _step_unless(optimizer, skipped: torch.Tensor) -> None:
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skipped
        optimizer.step()
    elif not skipped.item():
        optimizer.step()
