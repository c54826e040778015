"""The precision of a run's training steps (``--precision``): fp32, or the networks in bf16.

A bf16 training step runs inside :func:`step_context`, which the engine's steppers enter
around each step (:mod:`iwae.engine`, :mod:`iwae.lockstep`): it is the model's
:meth:`iwae.latent.GaussianLatentModel.network_precision`, under which every forward pass of
an encoder or decoder network runs under ``torch.autocast(device_type, dtype=torch.bfloat16)``
and its outputs are cast back to float32 where they leave the network
(:meth:`iwae.latent.GaussianLatentModel.call_network`). The samples, log-densities,
log-weights, bounds and their reductions, the gradient surrogates, the parameters, their
gradients and Adam's moments are all float32. Evaluation (the logged test bounds, L_k,
IWAE-64, AIS, active units) runs outside that context, in float32, whatever the run was
trained with.

``auto`` is decided in one place, :func:`decide`, when a run starts (a resumed run trains
in the precision its ``config.json`` records, never deciding again): bf16 where the
hardware computes it natively (:func:`native_bf16`: a CPU with AVX512-BF16 or AMX, or a
CUDA GPU with bf16) and a short timing of both precisions on the run's own model shape
(:func:`measure`, once per shape in a process, the two precisions timed in turn step by
step) finds bf16 at least 20% faster; else fp32.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time

import torch

from iwae.bounds import Objective
from iwae.config import PRECISIONS, TrainConfig
from iwae.errors import IwaeError
from iwae.latent import GaussianLatentModel, LatentVariableModel
from iwae.optim import adam, train_step

__all__ = ["PRECISIONS", "decide", "measure", "native_bf16", "step_context", "summary_record"]

#: bf16 is chosen by ``auto`` where its measured step time is below this fraction of fp32's:
#: on an AMD EPYC with AVX512-BF16 a k=50 step is 1.4-1.7x faster in bf16, a k=5 step
#: 0.96-1.14x, on either side of 1 from one timing to the next, and k=5 training was no
#: faster with bf16 (bench/RESULTS.md)
BF16_MARGIN = 0.8
#: the timing of the two precisions: steps of each not timed first, then up to
#: ``TIMING_STEPS`` timed steps of each in turn, stopping early after ``TIMING_SECONDS`` of
#: timed steps in all (at least 3 of each)
TIMING_WARMUP = 3
TIMING_STEPS = 30
TIMING_SECONDS = 1.0
#: CPU flags (/proc/cpuinfo) of native bf16 arithmetic
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

#: the step times of :func:`measure`, by shape, for this process
_MEASURED: dict[tuple, dict[str, float]] = {}


def step_context(model: LatentVariableModel, precision: str):
    """The context a training step of ``model`` in ``precision`` (fp32 or bf16) runs in:
    nothing for fp32 (the step is the plain float32 step, bit for bit), the model's
    :meth:`~iwae.latent.GaussianLatentModel.network_precision` to bfloat16 for bf16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise IwaeError(f"a training step runs in fp32 or bf16, not {precision!r}")
    return model.network_precision(torch.bfloat16)


def cpu_flags() -> set[str]:
    """The feature flags of this machine's CPU (/proc/cpuinfo; empty where it is not there)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CPU with AVX512-BF16 or AMX
    (:data:`BF16_CPU_FLAGS`), a CUDA GPU that supports bf16."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(set(BF16_CPU_FLAGS) & cpu_flags())
    return False


def step_seconds(
    model: LatentVariableModel, objective: Objective, x: torch.Tensor
) -> dict[str, float]:
    """The median seconds of a training step (:func:`iwae.optim.train_step` with an Adam of
    its own) of a copy of ``model`` on the batch ``x`` [B, D] in each precision, fp32 and
    bf16, timed in turn step by step after :data:`TIMING_WARMUP` steps of each not timed
    (see :data:`TIMING_STEPS`): a change of the machine's load while they are timed (another
    process starting or ending) weighs on both alike, where timing one precision after the
    other made a tiny model's bf16 steps, slower on a quiet machine, come out faster."""
    copies = {p: copy.deepcopy(model).train() for p in ("fp32", "bf16")}
    optimizers = {p: adam(m.parameters()) for p, m in copies.items()}
    generators = {p: torch.Generator(device=x.device).manual_seed(0) for p in copies}
    params = {p: (m.encoder_parameters(), m.decoder_parameters()) for p, m in copies.items()}
    times: dict[str, list[float]] = {p: [] for p in copies}
    for i in range(TIMING_WARMUP + TIMING_STEPS):
        for p, m in copies.items():
            with step_context(m, p):
                t0 = time.perf_counter()
                _, skipped = train_step(m, objective, optimizers[p], x, generators[p], params[p])
                skipped.item()  # waits for the device
            if i >= TIMING_WARMUP:
                times[p].append(time.perf_counter() - t0)
        if len(times["fp32"]) >= 3 and sum(times["fp32"]) + sum(times["bf16"]) > TIMING_SECONDS:
            break
    return {p: statistics.median(t) for p, t in times.items()}


def measure(
    model: LatentVariableModel, objective: Objective, batch_size: int, x_dim: int, device
) -> dict[str, float]:
    """Seconds per training step in fp32 and in bf16 (:func:`step_seconds`) of ``model``
    with ``objective`` on random binary batches of ``batch_size`` x ``x_dim``: measured once
    per shape (architecture, batch, samples per example, q stopped or not, device, threads)
    in this process, so that the runs of a lockstep group (:func:`iwae.lockstep.lockstep_key`)
    decide alike; the generators of torch are left as they were."""
    device = torch.device(device)
    key = (
        str(device),
        torch.get_num_threads(),
        type(model).__qualname__,
        tuple(tuple(p.shape) for p in model.parameters()),
        batch_size,
        objective.samples,
        objective.stops_q,
    )
    if key not in _MEASURED:
        x = torch.bernoulli(torch.full((batch_size, x_dim), 0.5), generator=torch.Generator())
        x = x.to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _MEASURED[key] = step_seconds(model, objective, x)
    return dict(_MEASURED[key])


def decide(
    config: TrainConfig,
    model: LatentVariableModel,
    objective: Objective | None,
    device,
    shard: tuple[int, int] | None = None,
) -> tuple[TrainConfig, dict | None]:
    """The configuration a new run trains with, ``precision`` fp32 or bf16 (and
    ``precision_requested`` auto where it was decided here; None where it was asked for as
    it is), and what ``auto`` was decided on (None for fp32 or bf16 asked for):
    ``native_bf16`` and, where bf16 is native, the measured ``step_seconds`` of each
    precision. ``objective``: the run's own
    (None: the configuration's). A model not built on
    :class:`iwae.latent.GaussianLatentModel` trains in fp32 (its networks cannot be told
    apart from its log-weights); under torchrun (``shard``) auto is fp32 (the processes
    would time differently)."""
    requested = "auto" if config.precision == "auto" else config.precision_requested
    precision, record = config.precision, None
    gaussian = isinstance(model, GaussianLatentModel)
    if precision == "bf16" and not gaussian:
        raise IwaeError(
            f"precision bf16 needs a model built on iwae.latent.GaussianLatentModel (its networks "
            f"run under autocast, its log-densities in float32); {type(model).__name__} is not: "
            "train it in fp32"
        )
    if precision == "auto":
        device = torch.device(device)
        record = {"native_bf16": native_bf16(device)}
        precision = "fp32"
        if record["native_bf16"] and gaussian and shard is None:
            objective = objective or config.objective_spec
            x_dim = config.data.x_dim
            times = measure(model, objective, config.batch_size, x_dim, device)
            record["step_seconds"] = times
            precision = "bf16" if times["bf16"] < BF16_MARGIN * times["fp32"] else "fp32"
    return config.replace(precision=precision, precision_requested=requested), record


def summary_record(config: TrainConfig, measured: dict | None) -> dict:
    """The keys of ``summary.json`` that say how a run computed: ``precision`` (fp32 or
    bf16), ``precision_requested``, and ``precision_measured`` where auto was decided in
    this process (:func:`decide`)."""
    record = {
        "precision": config.precision,
        "precision_requested": config.precision_requested or config.precision,
    }
    if measured is not None:
        record["precision_measured"] = measured
    return record
