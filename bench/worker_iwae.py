"""Benchmark phases run in iwae's own venv, one phase per process (see bench/run.py).

Phases: ``meta`` (versions, data, matmul roofline), ``train`` (throughput of the
training step), ``precision`` (fp32 against bf16 training steps), ``ftz`` (denormals
flushed or not), ``lockstep`` and ``grid`` (runs trained together against one at a time),
``groups`` (lockstep groups on ``--device``, a GPU where there is one), ``eval``
(throughput of iwae.evaluate.evaluate) and ``correctness`` (fast evaluation against a
float64 torch.distributions reference fed the same eps).
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import distributions as D

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import time_course, time_steps, worker_main  # noqa: E402

import iwae  # noqa: E402
from iwae import latent as iwae_latent  # noqa: E402
from iwae.bounds import Objective  # noqa: E402
from iwae.checkpoint import CHECKPOINT_FILE, load_checkpoint  # noqa: E402
from iwae.data import binarize_fixed, load_mnist  # noqa: E402
from iwae.evaluate import MAX_ROWS, evaluate, log_weight_reductions  # noqa: E402
from iwae.experiments import reproduce  # noqa: E402
from iwae.model import PRESETS, VAE, ModelConfig  # noqa: E402
from iwae.precision import (  # noqa: E402
    BF16_CPU_FLAGS,
    BF16_MARGIN,
    cpu_flags,
    decide,
    measure,
    native_bf16,
    step_context,
)
from iwae.train import (  # noqa: E402
    LockstepStep,
    TrainConfig,
    adam,
    auto_threads,
    pick_device,
    train,
    train_lockstep,
    train_step,
)

# -- data -------------------------------------------------------------------------------


def prepare_data(spec) -> dict:
    """Write ``spec["data_file"]`` (npz): ``train`` grey images (the pool the training
    loops binarize) and ``test`` binarized test images, from MNIST when it can be read,
    else synthetic images of the same shape."""
    n_train, n_test = spec["n_train_pool"], spec["n_test"]
    source = "synthetic"
    try:
        if spec.get("data_dir") is None:
            raise FileNotFoundError("no data dir")
        arrays = load_mnist(spec["data_dir"], download=False)
        train, test = arrays["train"][:n_train], binarize_fixed(arrays["test"][:n_test], seed=0)
        pixel_mean = arrays["train"].mean(0)
        source = f"mnist ({spec['data_dir']})"
    except Exception as e:  # no data: synthetic images with MNIST-like sparsity
        rng = np.random.default_rng(0)
        base = rng.random((n_train + n_test, 784), dtype=np.float32) ** 6
        train = base[:n_train]
        test = (rng.random((n_test, 784), dtype=np.float32) < base[n_train:]).astype(np.float32)
        pixel_mean = train.mean(0)
        source = f"synthetic ({type(e).__name__}: {e})"
    np.savez(
        spec["data_file"],
        train=train.astype(np.float32),
        test=test.astype(np.float32),
        pixel_mean=pixel_mean.astype(np.float32),
    )
    return source


def load_data(spec):
    d = np.load(spec["data_file"])
    return (
        torch.from_numpy(d["train"]),
        torch.from_numpy(d["test"]),
        torch.from_numpy(d["pixel_mean"]),
    )


# -- meta: versions, CPU, roofline ------------------------------------------------------


def matmul_gflops(m: int, k: int, n: int, dtype, min_s: float) -> float:
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(3):
        n_it, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            n_it += 1
            dt = time.perf_counter() - t0
            if dt >= min_s / 3:
                break
        best = max(best, 2.0 * m * k * n * n_it / dt / 1e9)
    return best


def phase_meta(spec) -> dict:
    source = prepare_data(spec)
    shapes = spec["matmul_shapes"]
    roof = []
    for name, (m, k, n) in shapes.items():
        roof.append(
            {
                "name": name,
                "m": m,
                "k": k,
                "n": n,
                "gflops_fp32": round(matmul_gflops(m, k, n, torch.float32, spec["matmul_s"]), 2),
            }
        )
    return {
        "torch": torch.__version__,
        "iwae_file": iwae.__file__,
        "data": source,
        "presets": {
            str(l): {"latent": list(p["latent"]), "hidden": [list(h) for h in p["hidden"]]}
            for l, p in PRESETS.items()
        },
        "mkldnn": torch.backends.mkldnn.is_available(),
        "matmul": roof,
        # the threads `iwae train --threads auto` would use for each step size (rows = batch x k)
        "auto_threads": {
            str(rows): auto_threads(rows, spec["threads"]) for rows in spec.get("step_rows", [])
        },
    }


# -- training ---------------------------------------------------------------------------


def make_train_step(
    layers: int,
    k: int,
    batch: int,
    train_x: torch.Tensor,
    pixel_mean,
    seed: int = 0,
    precision: str = "fp32",
):
    """The training step of iwae.train.train: its own train_step (zero_grad, log-weights,
    Objective.backward, the non-finite check, Adam.step) with its optimizer (iwae.train.adam)
    and its generator, in ``precision`` (iwae.precision.step_context, as the engine's
    steppers run it); the pool of images is re-binarized and re-shuffled each pass as
    train.py does for the whole training set."""
    torch.manual_seed(seed)
    model = VAE(ModelConfig.preset(layers), pixel_mean=pixel_mean)
    objective = Objective("iwae", k=k)
    params = (model.encoder_parameters(), model.decoder_parameters())
    optimizer = adam(model.parameters(), 1e-3, (0.9, 0.999), 1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    n = train_x.shape[0]
    state = {"i": n, "xb_all": None, "bound_sum": torch.zeros(())}

    def step():
        if state["i"] + batch > n:  # a new pass over the pool
            state["xb_all"] = torch.bernoulli(
                train_x[torch.randperm(n, generator=generator)], generator=generator
            )
            state["i"] = 0
        xb = state["xb_all"][state["i"] : state["i"] + batch]
        state["i"] += batch
        with step_context(model, precision):
            value, _ = train_step(model, objective, optimizer, xb, generator, params)
        state["bound_sum"] += value * xb.shape[0]

    return step, state


def default_precision(layers: int, k: int, batch: int, pixel_mean) -> tuple[str, dict | None]:
    """The precision ``iwae train`` trains IWAE of this shape in on this machine by default:
    TrainConfig's default ``precision``, with auto decided as a run decides it
    (iwae.precision.decide); and what auto measured (None where it did not decide)."""
    config = TrainConfig(objective="iwae", k=k, batch_size=batch, layers=layers)
    model = VAE(ModelConfig.preset(layers), pixel_mean=pixel_mean)
    config, measured = decide(config, model, None, "cpu")
    return config.precision, measured


def _job_step(job: dict, train_x, pixel_mean):
    """make_train_step for ``job`` (layers, k, batch) in the precision the job names, else
    the one ``iwae train`` picks by default (default_precision): the step, its state, the
    precision and what auto measured (None where the job named it)."""
    precision, measured = job.get("precision"), None
    if precision is None:
        precision, measured = default_precision(job["layers"], job["k"], job["batch"], pixel_mean)
    step, state = make_train_step(
        job["layers"], job["k"], job["batch"], train_x, pixel_mean, precision=precision
    )
    return step, state, precision, measured


def phase_train(spec) -> dict:
    train_x, _, pixel_mean = load_data(spec)
    t = spec["timing"]
    results = []
    for job in spec["jobs"]:
        torch.set_num_threads(
            int(job.get("threads") or spec["threads"])
        )  # --iwae-threads auto: per configuration
        step, state, precision, measured = _job_step(job, train_x, pixel_mean)
        timing = time_steps(step, t["warmup_steps"], t["warmup_s"], t["repeats"], t["min_s"])
        bound = state["bound_sum"].item()
        if not math.isfinite(bound):
            raise RuntimeError(f"training diverged in the benchmark: {job}")
        results.append(
            {
                **job,
                "examples_per_s": timing["median_steps_per_s"] * job["batch"],
                "best_examples_per_s": timing["best_steps_per_s"] * job["batch"],
                "timing": timing,
                "threads": torch.get_num_threads(),
                "precision": precision,
                "precision_measured": measured,
            }
        )
    return {"results": results}


def phase_course(spec) -> dict:
    """The training rate of the train phase's k=50 step (``spec["job"]``, in the precision
    iwae train picks by default) over ``spec["seconds"]`` of training from initialization,
    per window of ``spec["window_s"]`` seconds (_common.time_course), on the pool of
    ``spec["n_train_pool"]`` images."""
    if not Path(spec["data_file"]).exists():
        spec["source"] = prepare_data(spec)
    train_x, _, pixel_mean = load_data(spec)
    job = spec["job"]
    step, _, precision, _ = _job_step(job, train_x, pixel_mean)
    course = time_course(step, spec["seconds"], spec["window_s"])
    return {**job, **course, "precision": precision, "source": spec.get("source")}


# -- precision: fp32 against bf16 training steps -----------------------------------------


def phase_precision(spec) -> dict:
    """Training-step times in fp32 and in bf16 (the networks under bfloat16 autocast:
    iwae.precision), for Burda et al.'s models of ``spec["layers"]`` stochastic layers, IWAE
    with k in ``spec["ks"]``, batch ``spec["batch"]``, timed as the train phase times its
    steps; beside each row, what ``--precision auto`` measures for that shape
    (iwae.precision.measure: a short timing on random data) and would choose."""
    if not Path(spec["data_file"]).exists():
        spec["source"] = prepare_data(spec)
    train_x, _, pixel_mean = load_data(spec)
    t = spec["timing"]
    rows = []
    for layers in spec["layers"]:
        for k in spec["ks"]:
            row = {"layers": layers, "k": k, "batch": spec["batch"]}
            for p in ("fp32", "bf16"):
                step, state = make_train_step(
                    layers, k, spec["batch"], train_x, pixel_mean, precision=p
                )
                timing = time_steps(
                    step, t["warmup_steps"], t["warmup_s"], t["repeats"], t["min_s"]
                )
                if not math.isfinite(state["bound_sum"].item()):
                    raise RuntimeError(f"training diverged in the benchmark: {row} {p}")
                row[f"{p}_ms_per_step"] = 1e3 / timing["median_steps_per_s"]
                row[f"{p}_timing"] = timing
            row["bf16_speedup"] = row["fp32_ms_per_step"] / row["bf16_ms_per_step"]
            model = VAE(ModelConfig.preset(layers), pixel_mean=pixel_mean)
            auto = measure(model, Objective("iwae", k=k), spec["batch"], 784, "cpu")
            row["auto_step_seconds"] = auto
            row["auto_choice"] = "bf16" if auto["bf16"] < BF16_MARGIN * auto["fp32"] else "fp32"
            rows.append(row)
    return {
        "results": rows,
        "native_bf16": native_bf16(torch.device("cpu")),
        "bf16_cpu_flags": sorted(set(BF16_CPU_FLAGS) & cpu_flags()),
        "torch": torch.__version__,
    }


# -- denormals: k=50 steps with and without flushing, on a model trained for a pass -------


def _ftz_step(model, objective, optimizer, params, train_x, seed: int):
    """A training step (``train_step``) on the next batch of 20 of ``train_x``, binarized
    with a generator seeded ``seed``, as a function of no arguments."""
    generator, state = torch.Generator().manual_seed(seed), {"i": 0}

    def step():
        i = state["i"] % (train_x.shape[0] // 20)
        state["i"] += 1
        train_step(
            model,
            objective,
            optimizer,
            torch.bernoulli(train_x[i * 20 : (i + 1) * 20], generator=generator),
            generator,
            params,
        )

    return step


def phase_ftz(spec) -> dict:
    """Train IWAE k=5 (1 layer, batch 20) for one pass over MNIST with iwae.train.train, so
    that weights, gradients and Adam's moments are those of a real run, then time IWAE k=50
    training steps from that state (weights and Adam state restored before each block)
    with denormals flushed and not, in alternating blocks; returns examples/s of each."""

    t = spec["timing"]
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            dataset="mnist",
            objective="iwae",
            k=5,
            epochs=1,
            eval_n=64,
            stage_nll_k=0,
            n_train=spec.get("n_train"),
            data_dir=spec["data_dir"],
        )
        torch.set_flush_denormal(True)
        t0 = time.perf_counter()
        train(config, tmp, progress=False)
        pass_s = time.perf_counter() - t0
        model = VAE(ModelConfig.preset(1))
        optimizer = adam(model.parameters(), 1e-3, (0.9, 0.999), 1e-4)
        load_checkpoint(Path(tmp) / CHECKPOINT_FILE, model, optimizer, torch.Generator())
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    denormal = sum(
        int(((v != 0) & (v.abs() < torch.finfo(torch.float32).tiny)).sum())
        for v in [
            *model.state_dict().values(),
            *(x for st in optimizer.state.values() for x in st.values()),
        ]
    )
    train_x, _, _ = load_data(spec)
    objective, params = (
        Objective("iwae", k=50),
        (model.encoder_parameters(), model.decoder_parameters()),
    )
    rates = {True: [], False: []}
    for block in range(2 * t["repeats"]):
        flush = block % 2 == 1
        torch.set_flush_denormal(flush)
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        step = _ftz_step(model, objective, optimizer, params, train_x, block)
        timing = time_steps(step, t["warmup_steps"], 0.0, 1, t["min_s"])
        rates[flush].append(timing["median_steps_per_s"] * 20)
    torch.set_flush_denormal(True)

    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    return {
        "examples_per_s_flushed": on,
        "examples_per_s_not_flushed": off,
        "ftz_speedup_k50": on / off,
        "blocks": {"flushed": rates[True], "not_flushed": rates[False]},
        "warm_pass_seconds": pass_s,
        "denormal_values_in_state": denormal,
        "n_train": config.n_train or 60000,
    }


# -- lockstep: 8 models stepped together against one at a time ----------------------------


def _eight_models(k: int, pixel_mean):
    """VAE and IWAE with k samples x seeds 0..3 (1 layer): models, objectives, generators."""
    models, objectives, generators, optimizers = [], [], [], []
    for seed in range(4):
        for name in ("vae", "iwae"):
            torch.manual_seed(seed)
            models.append(VAE(ModelConfig.preset(1), pixel_mean=pixel_mean))
            objectives.append(Objective(name, k=k))
            generators.append(torch.Generator().manual_seed(seed))
            optimizers.append(adam(models[-1].parameters(), 1e-3, (0.9, 0.999), 1e-4))
    return models, objectives, generators, optimizers


def _eight_model_rounds(k: int, train_x, pixel_mean):
    """(one step of each of :func:`_eight_models` in turn, one step of all 8 together by a
    LockstepStep): 8 model-steps each, on the next batches of 20 of ``train_x``."""
    models, objectives, generators, optimizers = _eight_models(k, pixel_mean)
    params = [(m.encoder_parameters(), m.decoder_parameters()) for m in models]
    n_batches, state = train_x.shape[0] // 20, {"i": 0}

    def batch(j):
        i = (state["i"] + j) % n_batches
        return torch.bernoulli(train_x[i * 20 : (i + 1) * 20], generator=generators[j])

    def single_round():
        for j, m in enumerate(models):
            train_step(m, objectives[j], optimizers[j], batch(j), generators[j], params[j])
        state["i"] += 1

    lock = LockstepStep(models, objectives, generators)

    def lockstep_round():
        lock.step(torch.stack([batch(j) for j in range(len(models))]))
        state["i"] += 1

    return single_round, lockstep_round


def phase_lockstep(spec) -> dict:
    """Model-steps/s of 8 MNIST 1-layer models (VAE and IWAE x 4 seeds), batch 20: each
    stepped alone in turn by iwae.train.train_step, and all 8 by iwae.train.LockstepStep;
    ``lockstep_speedup`` = lockstep model-steps/s / single model-steps/s, per k."""
    train_x, _, pixel_mean = load_data(spec)
    t = spec["timing"]
    results = {}
    for k in spec["ks"]:
        single_round, lockstep_round = _eight_model_rounds(k, train_x, pixel_mean)
        single = time_steps(
            single_round, t["warmup_steps"], t["warmup_s"], t["repeats"], t["min_s"]
        )
        grouped = time_steps(
            lockstep_round, t["warmup_steps"], t["warmup_s"], t["repeats"], t["min_s"]
        )
        results[str(k)] = {
            "single_model_steps_per_s": 8 * single["median_steps_per_s"],
            "lockstep_model_steps_per_s": 8 * grouped["median_steps_per_s"],
            "lockstep_speedup": grouped["median_steps_per_s"] / single["median_steps_per_s"],
            "single": single,
            "lockstep": grouped,
        }
    return {"models": 8, "batch": 20, "threads": torch.get_num_threads(), "by_k": results}


def phase_grid(spec) -> dict:
    """Wall time of ``iwae reproduce table1 --only dataset=mnist --only layers=1 --only k=5
    --seeds 4`` (8 runs) at a fixed short budget on ``workers`` worker processes: one run per
    process, then in lockstep; ``grid_speedup`` = the first / the second."""

    walls = {}
    for lockstep in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            reproduce(
                "table1",
                tmp,
                stages=1,
                seeds=4,
                workers=spec["workers"],
                data_dir=spec["data_dir"],
                only={"dataset": "mnist", "layers": "1", "k": "5"},
                overrides=spec["overrides"],
                eval_k=spec["eval_k"],
                n_test=spec["n_test"],
                progress=False,
                lockstep=lockstep,
            )
            walls["lockstep" if lockstep else "one_run_per_process"] = time.perf_counter() - t0
    return {
        "seconds": walls,
        "grid_speedup": walls["one_run_per_process"] / walls["lockstep"],
        "workers": spec["workers"],
        "overrides": spec["overrides"],
        "eval_k": spec["eval_k"],
        "n_test": spec["n_test"],
    }


# -- groups: lockstep groups trained by iwae.train.train_lockstep on --device -----------------


def _time_group(layers: int, k: int, group: int, cuda_graphs: str, device, spec) -> dict:
    """Train ``group`` runs (IWAE and VAE alternating, seeds 0, 1, ...) side by side with
    :func:`iwae.train.train_lockstep` and time the last pass: one row of :func:`phase_groups`."""

    configs = [
        TrainConfig(
            dataset="mnist",
            layers=layers,
            objective=("iwae", "vae")[g % 2],
            k=k,
            seed=g // 2,
            stages=None,
            epochs=spec["epochs"],
            n_train=spec["n_train"],
            eval_every=10_000,
            stage_nll_k=0,
            data_dir=spec["data_dir"],
        )
        for g in range(group)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"run{g}" for g in range(group)]
        t0 = time.perf_counter()
        summaries = train_lockstep(
            configs, outs, progress=False, device=str(device), cuda_graphs=cuda_graphs
        )
        wall = time.perf_counter() - t0
        last = json.loads((outs[0] / "metrics.jsonl").read_text().splitlines()[-1])
    steps = -(-spec["n_train"] // 20)
    return {
        "layers": layers,
        "k": k,
        "group": group,
        "cuda_graphs_asked": cuda_graphs,
        "cuda_graphs": summaries[0].get("cuda_graphs"),
        "group_steps_per_s": round(steps / last["seconds"], 1),
        "model_steps_per_s": round(group * steps / last["seconds"], 1),
        "last_pass_s": round(last["seconds"], 3),
        "wall_s": round(wall, 1),
    }


def phase_groups(spec) -> dict:
    """Training rate of lockstep groups on ``spec["device"]``, as ``iwae reproduce`` trains
    them: for each row of ``spec["groups"]`` (layers, k, group size, cuda_graphs), ``group``
    runs of Burda et al.'s architecture train together on the first ``n_train`` MNIST
    training images (``spec["n_train"]`` by device type: fewer on a CPU, where steps are slower)
    for ``epochs`` passes at batch 20 (:func:`_time_group`). The last pass is
    timed (the first holds the CUDA-graph capture and the warm-up): ``group_steps_per_s`` =
    steps of that pass / its seconds, ``model_steps_per_s`` = ``group`` times that.
    ``cuda_graphs`` in a row is what the runs' ``summary.json`` says: whether the steps were
    replayed from a CUDA graph. Off CUDA the rows that ask for graphs ``off`` are left out
    (the same as ``auto`` there). A ``cuda`` device without CUDA skips the phase
    (``skipped`` says why)."""
    if str(spec["device"]).startswith("cuda") and not torch.cuda.is_available():
        return {"skipped": f"device {spec['device']!r} asked for, but torch sees no CUDA device"}
    device = pick_device(spec["device"])
    spec = {**spec, "n_train": spec["n_train"]["cuda" if device.type == "cuda" else "cpu"]}
    rows = [
        _time_group(layers, k, group, cuda_graphs, device, spec)
        for layers, k, group, cuda_graphs in spec["groups"]
        if device.type == "cuda" or cuda_graphs != "off"
    ]
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "n_train": spec["n_train"],
        "epochs": spec["epochs"],
        "batch": 20,
        "rows": rows,
    }


# -- evaluation -------------------------------------------------------------------------


def phase_eval(spec) -> dict:
    train_x, test_x, pixel_mean = load_data(spec)
    torch.manual_seed(0)
    model = VAE(ModelConfig.preset(spec["layers"]), pixel_mean=pixel_mean)
    k, n = spec["k"], spec["n_images"]
    x = test_x[:n]
    evaluate(model, test_x[: spec["warmup_images"]], k=k, seed=1)  # warm-up
    t0 = time.perf_counter()
    result = evaluate(model, x, k=k, seed=0)
    dt = time.perf_counter() - t0
    return {
        "layers": spec["layers"],
        "k": k,
        "n_images": n,
        "seconds": dt,
        "images_per_s": n / dt,
        "seconds_per_10k": 10000 * dt / n,
        "nll": result["nll"],
    }


# -- correctness ------------------------------------------------------------------------


class _RandnRecorder:
    """Stands in for the ``torch`` module inside iwae.latent only: records every
    torch.randn draw (the eps of the reparameterization) and passes everything else on."""

    def __init__(self, real):
        self._real = real
        self.draws: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def randn(self, *args, **kwargs):
        t = self._real.randn(*args, **kwargs)
        self.draws.append(t.detach().clone())
        return t


def fast_with_eps(model: VAE, x, k: int, seed: int, max_rows: int):
    """iwae's fast evaluation, and the eps it drew, rearranged per example:
    a list over layers of [N, k, d_l] tensors."""
    if max_rows is None:
        max_rows = MAX_ROWS
    recorder = _RandnRecorder(torch)
    iwae_latent.torch = recorder
    try:
        r = log_weight_reductions(model, x, k, k_small=64, seed=seed, max_rows=max_rows)
    finally:
        iwae_latent.torch = torch
    L, n = model.n_layers, x.shape[0]
    eps = [torch.empty(n, k, d) for d in model.config.latent]
    draws = recorder.draws
    if len(draws) % L:
        raise AssertionError(f"{len(draws)} randn draws for {L} layers")
    e = s = 0
    for g in range(0, len(draws), L):  # one log_weights call: [ns, ne, d_l] per layer
        ns, ne = draws[g].shape[:2]
        for l in range(L):
            eps[l][e : e + ne, s : s + ns] = draws[g + l].transpose(0, 1)
        s += ns
        if s == k:
            e, s = e + ne, 0
    if (e, s) != (n, 0):
        raise AssertionError("the recorded eps do not cover every (example, sample) once")
    return r, eps


def reference_log_weights(m64: VAE, x: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
    """log w for ONE example x [D] and its k samples, float64, torch.distributions,
    written from the model's definition (not from its methods):
    h_l = mu_l + sigma_l * eps_l, log w = log p(h_L) + sum log p(h_{l-1}|h_l) + log p(x|h_1)
    - sum log q(h_l|h_{l-1})."""

    def gaussian(layer, u):
        a = layer.net(u)
        s = layer.scale(a)
        std = s.exp() if layer.scale_kind == "exp" else torch.nn.functional.softplus(s)
        return D.Normal(layer.mean(a), std)

    hs, log_q, u = [], 0.0, x
    for layer, e in zip(m64.encoder, eps):
        q = gaussian(layer, u)
        h = q.loc + q.scale * e
        log_q = log_q + q.log_prob(h).sum(-1)
        hs.append(h)
        u = h
    log_p = D.Normal(torch.zeros_like(hs[-1]), torch.ones_like(hs[-1])).log_prob(hs[-1]).sum(-1)
    for l in range(1, len(hs)):
        log_p = log_p + gaussian(m64.decoder[l], hs[l]).log_prob(hs[l - 1]).sum(-1)
    logits = m64.decoder[0](hs[0])
    log_p = log_p + D.Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    return log_p - log_q


def phase_correctness(spec) -> dict:
    train_x, test_x, pixel_mean = load_data(spec)
    k, n, tol = spec["k"], spec["n_images"], spec["tolerance_nats"]
    x = test_x[:n]
    checks = []
    for layers in spec["layers"]:
        # a fixed model: seeded init, then a few IWAE steps so that q is not the prior
        torch.manual_seed(123)
        model = VAE(ModelConfig.preset(layers), pixel_mean=pixel_mean)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
        gen = torch.Generator().manual_seed(0)
        for i in range(spec["train_steps"]):
            xb = torch.bernoulli(train_x[(i * 20) % (train_x.shape[0] - 20) :][:20], generator=gen)
            opt.zero_grad(set_to_none=True)
            Objective("iwae", k=5).backward(
                model.log_weights(xb, 5), model.encoder_parameters(), model.decoder_parameters()
            )
            opt.step()
        model.eval()
        m64 = copy.deepcopy(model).double()
        full = evaluate(model, x, k=k, seed=7)  # the public entry point, default max_rows
        for max_rows in spec["max_rows"]:
            fast, eps = fast_with_eps(model, x, k, seed=7, max_rows=max_rows)
            ref = {"log_px": [], "small": [], "elbo": []}
            with torch.no_grad():
                for i in range(n):  # one example at a time
                    lw = reference_log_weights(m64, x[i].double(), [e[i].double() for e in eps])
                    ref["log_px"].append(torch.logsumexp(lw, 0) - math.log(k))
                    ref["small"].append(torch.logsumexp(lw[:64], 0) - math.log(min(64, k)))
                    ref["elbo"].append(lw.mean())
            diffs = {}
            for key in ref:
                r = torch.stack(ref[key])
                diffs[key] = (fast[key].double() - r).abs().max().item()
            nll_ref = -torch.stack(ref["log_px"]).mean().item()
            nll_fast = -fast["log_px"].double().mean().item()
            checks.append(
                {
                    "layers": layers,
                    "max_rows": max_rows,
                    "k": k,
                    "n_images": n,
                    "nll_fast": nll_fast,
                    "nll_reference": nll_ref,
                    "nll_abs_diff": abs(nll_fast - nll_ref),
                    "max_abs_diff_per_example": diffs,
                    "evaluate_nll": full["nll"] if max_rows is None else None,
                    "passed": max(diffs.values()) <= tol,
                }
            )
    # evaluate() (default max_rows, same seed) must report the NLL of the checked numbers
    for c in checks:
        if c["evaluate_nll"] is not None:
            c["evaluate_matches_checked"] = abs(c["evaluate_nll"] - c["nll_fast"]) <= 1e-6
            c["passed"] = c["passed"] and c["evaluate_matches_checked"]
    return {"tolerance_nats": tol, "checks": checks, "passed": all(c["passed"] for c in checks)}


if __name__ == "__main__":
    worker_main(
        {
            "meta": phase_meta,
            "train": phase_train,
            "eval": phase_eval,
            "correctness": phase_correctness,
            "ftz": phase_ftz,
            "lockstep": phase_lockstep,
            "grid": phase_grid,
            "groups": phase_groups,
            "precision": phase_precision,
            "course": phase_course,
        }
    )
