"""Freed tensors' memory kept in the process for the next ones (:func:`reuse_freed_memory`)."""

from __future__ import annotations

import ctypes

import torch

__all__ = ["reuse_freed_memory"]

#: glibc's ``mallopt`` parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: freed blocks up to this size stay in the heap for reuse (glibc's largest mmap threshold
#: on 64-bit machines; larger blocks are mapped and unmapped as before)
REUSE_MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap is handed back to the system above this size
REUSE_TRIM_THRESHOLD = 512 << 20


def reuse_freed_memory(device=None) -> bool:
    """Keep the memory of freed tensors of up to 32 MiB in this process for the next ones
    (glibc's ``mallopt``: the mmap threshold :data:`REUSE_MMAP_THRESHOLD`, the trim threshold
    :data:`REUSE_TRIM_THRESHOLD`), process-wide; returns whether it was set (False where the
    C library is not glibc, or ``device`` is given and is not the CPU, where it does nothing).
    Training and evaluation call it with their device
    (:func:`iwae.engine.train_group`, :func:`iwae.evaluate.log_weight_reductions`,
    :func:`iwae.evaluate.evaluate_ais`).

    Each CPU training step allocates and frees the same tensors of a few MiB (at k=50,
    batch 20: the [50, 20, 784] logits, their bf16 copy, their gradients). With glibc's
    defaults the heap's top is handed back to the system when more than a few MiB are free
    there, so every step maps its pages again, and the kernel faults in and zeroes each one:
    about 1,500 page faults (4-KiB pages) a bf16 step at k=50 on 1 thread, none with this set
    (``bench/RESULTS.md``). Nothing computed changes."""
    if device is not None and torch.device(device).type != "cpu":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap = mallopt(M_MMAP_THRESHOLD, REUSE_MMAP_THRESHOLD)
    return bool(mmap and mallopt(M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD))
