"""Data-parallel training under torchrun: joining the process group, the sharded backward
pass of a training step (:func:`iwae.optim.train_step` with ``shard``), and the barrier.

Every process gets the whole batch and draws the whole batch's noise from the same
generator, computes its share of the examples, and the weighted gradients are summed in
one all-reduce: the step is the single-process step up to the order of floating-point sums.
"""

from __future__ import annotations

import os

import torch

from iwae.model import BatchShard


def distributed_setup(device: torch.device) -> tuple[tuple[int, int] | None, torch.device]:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): gloo on CPU,
    nccl on GPU (one GPU per process, by LOCAL_RANK). Returns ((rank, world), device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()), device


def sharded_backward(
    model, objective, x, generator, enc, dec, rank: int, world: int
) -> torch.Tensor:
    """The backward pass of process ``rank`` of ``world`` on the examples rank, rank + world,
    ... of the batch ``x``; leaves the batch's summed gradients in ``enc + dec`` and returns
    the batch-mean bound (the same on every process)."""
    import torch.distributed as dist

    index = torch.arange(rank, x.shape[0], world, device=x.device)
    share = len(index) / x.shape[0]
    # every process draws the whole batch's noise, so the generators stay in step
    log_w = objective.log_weights(model, x[index], noise=BatchShard(generator, x.shape[0], index))
    value = (
        objective.backward(log_w, enc, dec) * share
        if len(index)
        else torch.zeros((), device=x.device)
    )
    params = enc + dec
    grads = [p.grad * share if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([value.reshape(1), *(g.reshape(-1) for g in grads)])
    dist.all_reduce(flat)
    offset = 1
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return flat[0]


def barrier(shard: tuple[int, int] | None) -> None:
    """Wait for every process of the group (nothing to wait for in a single process)."""
    if shard is not None:
        import torch.distributed as dist

        dist.barrier()
