"""Training: Burda et al.'s optimizer and schedule, the run directory, checkpoints.

Adam (beta1 = 0.9, beta2 = 0.999, eps = 1e-4), batches of 20, and the schedule of
Burda et al. (2016, section 5): stage i = 0, 1, ..., 7 runs 3^i passes over the
training set at learning rate 1e-3 * 10^(-i/7), 3,280 passes in all. Training
images are binarized afresh, pixel ~ Bernoulli(grey value), every time they are used.

A run directory holds

- ``config.json``       the resolved configuration (``iwae train --config`` takes it back),
- ``model.safetensors`` the weights, saved at the end of every stage,
- ``checkpoint.safetensors`` weights, Adam state, every random-number state and the
  position in the schedule, saved every few minutes and at the end of every stage,
- ``metrics.jsonl``     one JSON object per pass (train bound, learning rate, seconds,
  skipped steps, every few passes the IWAE-64 bound on a seeded random subset of the test
  set, and at every stage end the test NLL with ``stage_nll_k`` samples on that subset),
- ``tb/``               TensorBoard event files with the same numbers, active units and samples,
- ``summary.json``      written last: a run with it is finished.

Every file is written atomically (temporary file, fsync, rename), so a run killed at
any moment keeps its previous checkpoint; ``iwae train --resume RUN_DIR`` continues it
and ends with the same weights, bit for bit, as a run that was never interrupted.
Nothing in a run directory is executed when it is loaded: tensors are safetensors, the
rest is JSON.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from iwae import data as iwae_data
from iwae.bounds import Objective
from iwae.data import atomic_write
from iwae.errors import IwaeError, RunDirError
from iwae.model import VAE, ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tb"

DATASETS = ("mnist", "omniglot")


@dataclass
class TrainConfig:
    """Everything that determines a training run; stored as ``config.json``.

    The keys are the long options of ``iwae train`` with ``-`` written ``_``.
    """

    dataset: str = "mnist"
    layers: int = 1
    objective: str = "iwae"
    k: int = 1
    m: int = 1
    beta: float = 0.5
    estimator: str = "reparam"
    stages: int | None = 8
    epochs: int | None = None
    seed: int = 0
    batch_size: int = 20
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-4
    scale: str = "exp"
    validation: bool = False
    n_train: int | None = None
    eval_every: int = 10
    eval_n: int = 1000
    curve_k: int | None = None
    stage_nll_k: int = 5000
    checkpoint_minutes: float = 5.0
    max_bad_steps: int = 20
    init_weights: str | None = None
    data_dir: str | None = None
    model: dict = field(default_factory=dict)

    def __post_init__(self):
        self._check_types()
        if self.dataset not in DATASETS:
            raise IwaeError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.epochs is not None:
            self.stages = None
        if self.stages is not None and not 1 <= self.stages <= 8:
            raise IwaeError(f"stages must be between 1 and 8, got {self.stages}")
        if self.epochs is not None and self.epochs < 1:
            raise IwaeError(f"epochs must be >= 1, got {self.epochs}")
        if self.stages is None and self.epochs is None:
            raise IwaeError("give stages or epochs")
        for name in ("batch_size", "eval_every", "eval_n", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise IwaeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_train is not None and self.n_train < 1:
            raise IwaeError(f"n_train must be >= 1, got {self.n_train}")
        if self.stage_nll_k < 0:
            raise IwaeError(f"stage_nll_k must be >= 0 (0: off), got {self.stage_nll_k}")
        if self.curve_k is not None and self.curve_k < 64:
            raise IwaeError(f"curve_k must be >= 64 (IWAE-64 uses its first 64 samples), got {self.curve_k}")
        if not self.checkpoint_minutes > 0:
            raise IwaeError(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")
        if not (self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.adam_eps > 0):
            raise IwaeError("Adam needs lr > 0, 0 <= beta1, beta2 < 1 and eps > 0")
        self.objective_spec  # validates objective, k, m, beta, estimator
        if not self.model:
            self.model = ModelConfig.preset(self.layers, scale=self.scale).to_dict()
        self.model_config  # validates the architecture

    def _check_types(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                if ok:
                    setattr(self, f.name, float(value))
            elif kind.startswith("str"):
                ok = isinstance(value, str)
            elif kind == "bool":
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, dict)
            if not ok:
                raise IwaeError(f"{f.name} must be of type {kind}, got {value!r}")

    @property
    def objective_spec(self) -> Objective:
        return Objective(self.objective, self.k, self.m, self.beta, self.estimator)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def schedule(self) -> list[tuple[int, int, float]]:
        """(stage, passes, learning rate) for each stage."""
        if self.epochs is not None:
            return [(0, self.epochs, self.lr)]
        return [(i, 3**i, self.lr * 10 ** (-i / 7)) for i in range(self.stages)]

    @property
    def total_passes(self) -> int:
        return sum(p for _, p, _ in self.schedule())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise IwaeError(f"a configuration must be a table of keys and values, got {type(d).__name__}")
        d = {str(key).replace("-", "_"): value for key, value in d.items()}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise IwaeError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**d)


def read_config_file(path: str | Path) -> dict:
    """The keys of a TOML, YAML or JSON configuration file (``iwae train --config``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise IwaeError(f"cannot read configuration file {path}: {e}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            d = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        elif suffix == ".json":
            d = json.loads(text)
        else:
            raise IwaeError(f"configuration file {path}: expected .toml, .yaml, .yml or .json")
    except IwaeError:
        raise
    except Exception as e:  # each parser has its own error types
        raise IwaeError(f"configuration file {path} is not valid {suffix[1:].upper()}: {e}".replace("\n", " ")) from None
    if not isinstance(d, dict):
        raise IwaeError(f"configuration file {path} must hold a table of keys and values")
    return d


# -- files ---------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


EVALUATION_FILE = "evaluation.json"
EVALUATION_IMAGES_FILE = "evaluation.safetensors"


def write_evaluation(run_dir: Path, result: dict, per_image: dict[str, torch.Tensor], test_index) -> None:
    """``evaluation.safetensors`` (per-image ``log_px``, ``iwae64``, ``elbo`` and the
    ``test_index`` of each image in the test set), then ``evaluation.json`` (the means)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in per_image.items()}
    tensors["test_index"] = torch.as_tensor(np.asarray(test_index), dtype=torch.int32)
    atomic_write(Path(run_dir) / EVALUATION_IMAGES_FILE, lambda f: f.write(safetensors.torch.save(tensors)))
    write_json(Path(run_dir) / EVALUATION_FILE, result)


def read_evaluation_images(run_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The per-image values of a run's evaluation, or None where it has none."""
    path = Path(run_dir) / EVALUATION_IMAGES_FILE
    return _read_safetensors(path)[0] if path.exists() else None


def save_weights(model: VAE, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda f: f.write(safetensors.torch.save(state)))


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing: is {path.parent} a run directory made by `iwae train`?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise RunDirError(f"{path} is missing")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad files
        raise RunDirError(f"{path} is not a readable safetensors file (truncated or tampered?): {e}") from None
    return tensors, metadata


def _load_state(model: VAE, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise RunDirError(f"{path} does not match the model in config.json: {' '.join(lines[:3])}") from None


def load_config(run_dir: str | Path) -> TrainConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    try:
        return TrainConfig.from_dict(_read_json(run_dir / CONFIG_FILE))
    except RunDirError:
        raise
    except IwaeError as e:
        raise RunDirError(f"{run_dir / CONFIG_FILE}: {e}") from None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[TrainConfig, VAE]:
    """The configuration and trained model of a run directory. Reads JSON and
    safetensors only: nothing in a run directory is executed."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    model = VAE(config.model_config)
    path = run_dir / WEIGHTS_FILE
    if not path.exists():
        raise RunDirError(f"{path} is missing: the run has not finished its first stage yet")
    _load_state(model, _read_safetensors(path)[0], path)
    return config, model.to(device)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare_run_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Check that ``out`` can hold a new run (without creating it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunDirError(
            f"{out} is not empty: choose another --out, continue it with --resume, or pass --overwrite to replace it"
        )
    return out


# -- checkpoints ------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run is: ``passes`` finished passes, ``step`` steps into the next one."""

    passes: int = 0
    step: int = 0
    bound_sum: float = 0.0
    good_examples: int = 0
    skipped: int = 0
    consecutive_bad: int = 0
    seconds: float = 0.0  # training time of the unfinished pass so far
    total_seconds: float = 0.0


def save_checkpoint(path: Path, model: VAE, optimizer, generator, pass_start_rng, progress: Progress) -> None:
    """Weights, Adam state, RNG states and progress in one safetensors file, atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.pass_start"] = pass_start_rng
    tensors["rng.torch"] = torch.get_rng_state()
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {
        "progress": asdict(progress),
        "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python_rng": random.getstate(),
        "format": 1,
    }
    atomic_write(path, lambda f: f.write(safetensors.torch.save(tensors, metadata={"state": json.dumps(meta)})))


def load_checkpoint(path: Path, model: VAE, optimizer, generator, content=None) -> tuple[Progress, torch.Tensor]:
    """Restore what :func:`save_checkpoint` saved (``content``: the file already read by
    ``_read_safetensors``); returns the progress and the RNG state at the start of the
    unfinished pass."""
    tensors, metadata = content or _read_safetensors(path)
    try:
        meta = json.loads(metadata["state"])
        progress = Progress(**meta["progress"])
        _load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
        optim_state = optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                optim_state["state"].setdefault(int(i), {})[name] = value.to(model.output_layer.weight.device)
        optimizer.load_state_dict(optim_state)
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        kind, pos, has_gauss, cached = meta["numpy_rng"]
        np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        return progress, tensors["rng.pass_start"]
    except RunDirError:
        raise
    except Exception as e:  # a tampered file can break it anywhere
        raise RunDirError(f"{path} is not a valid iwae checkpoint ({type(e).__name__}: {e})") from None


# -- the loop ---------------------------------------------------------------------------------


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise IwaeError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IwaeError(f"device {device!r} requested, but torch sees no CUDA device")
    return dev


#: (example, sample) rows per training step below which one CPU thread is faster than
#: several: torch's intra-op threading of small kernels costs more than it saves. Measured
#: (bench/RESULTS.md, 2 cores, 1 layer, batch 20): 100 rows (k=5) 1.40x and 20 rows (k=1)
#: 1.71x faster on 1 thread than on 2; 500 rows (batch 100, k=5) 1.14x and 1,000 rows
#: (k=50) 1.78x faster on 2.
SMALL_STEP_ROWS = 256


def auto_threads(rows_per_step: int, cores: int | None = None) -> int:
    """CPU threads for training steps of ``rows_per_step`` = batch size x samples per example:
    1 below :data:`SMALL_STEP_ROWS`, else every core."""
    cores = cores or os.cpu_count() or 1
    return 1 if rows_per_step < SMALL_STEP_ROWS else cores


def flush_denormals(enabled: bool = True) -> bool:
    """Set the CPU to flush denormal floats to zero (FTZ/DAZ), process-wide; returns whether
    this CPU supports it (x86 with SSE3). On by default in every command: on some CPUs
    (the Intel Xeon kind with AMX) matmuls over weights and gradients holding denormals run
    several times slower, and values below 1.2e-38 do not move any bound this library
    computes (tests/test_train.py checks that the printed results are unchanged)."""
    return bool(torch.set_flush_denormal(enabled))


def adam(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-4) -> torch.optim.Adam:
    """Adam, fused into one kernel where this torch supports it for the parameters' device
    (CPU from torch 2.4): 1.2x faster training steps at batch 20, k=5 (bench/README.md)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


def train_step(model: VAE, objective: Objective, optimizer, x: torch.Tensor, generator=None, params=None,
               shard: tuple[int, int] | None = None):
    """One optimizer step on the batch ``x``; skipped if the bound or a gradient is not finite.

    Returns (batch-mean bound, whether the step was taken). ``params`` is the pair
    (encoder parameters, decoder parameters); pass it to avoid rebuilding the lists.

    With ``shard = (rank, world_size)`` (data parallel, under torchrun) every process
    gets the whole batch ``x`` and the same ``generator``, computes the examples
    rank, rank + world_size, ... with the noise one process would have drawn for them
    (:class:`iwae.model.BatchShard`), and the gradients, weighted by each share of the
    batch, are summed over processes in one all-reduce: the step is the single-process
    step up to the order of floating-point sums.
    """
    enc, dec = params or (model.encoder_parameters(), model.decoder_parameters())
    optimizer.zero_grad(set_to_none=True)
    if shard is None:
        value = objective.backward(objective.log_weights(model, x, generator), enc, dec)
    else:
        value = _sharded_backward(model, objective, x, generator, enc, dec, *shard)
    check = torch.stack([value, *(p.grad.sum() for p in enc + dec if p.grad is not None)]).sum()
    if not torch.isfinite(check):
        optimizer.zero_grad(set_to_none=True)
        return value, False
    optimizer.step()
    return value, True


def _sharded_backward(model, objective, x, generator, enc, dec, rank: int, world: int) -> torch.Tensor:
    import torch.distributed as dist

    from iwae.model import BatchShard

    index = torch.arange(rank, x.shape[0], world, device=x.device)
    share = len(index) / x.shape[0]
    # every process draws the whole batch's noise, so the generators stay in step
    log_w = objective.log_weights(model, x[index], BatchShard(generator, x.shape[0], index))
    value = objective.backward(log_w, enc, dec) * share if len(index) else torch.zeros((), device=x.device)
    params = enc + dec
    grads = [p.grad * share if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([value.reshape(1), *(g.reshape(-1) for g in grads)])
    dist.all_reduce(flat)
    offset = 1
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return flat[0]


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


def train(
    config: TrainConfig,
    out: str | Path,
    dataset: iwae_data.Dataset | None = None,
    progress: bool = True,
    overwrite: bool = False,
    device: str | None = None,
    resume: bool = False,
) -> dict:
    """Train a model as ``config`` says in the run directory ``out``, or with
    ``resume=True`` continue the run there from its checkpoint.

    ``dataset`` may be given directly (tests use small synthetic sets); otherwise it
    is loaded from ``config.data_dir``. Returns the summary that is also written to
    ``summary.json``.
    """
    out = Path(out)
    shard, dev = distributed_setup(pick_device(device))
    lead = shard is None or shard[0] == 0  # under torchrun, only rank 0 writes files
    if not resume:
        if lead:
            prepare_run_dir(out, overwrite)
    elif (out / SUMMARY_FILE).exists():
        return _read_json(out / SUMMARY_FILE)
    elif not (out / CHECKPOINT_FILE).exists():
        raise RunDirError(f"{out / CHECKPOINT_FILE} is missing: nothing to resume (start the run again without --resume)")
    checkpoint = _read_safetensors(out / CHECKPOINT_FILE) if resume else None  # a bad file fails before the data loads
    if dataset is None:
        dataset = iwae_data.load_dataset(config.dataset, config.data_dir, validation=config.validation)
    train_x = torch.tensor(dataset.train, dtype=torch.float32)  # a copy: the loaded arrays are read-only
    if config.n_train is not None:
        train_x = train_x[: config.n_train]
    if not (torch.isfinite(train_x).all() and train_x.min() >= 0 and train_x.max() <= 1):
        raise IwaeError(f"training images of {dataset.name} must be grey values in [0, 1] (found NaN, inf or others)")
    test_x = torch.from_numpy(iwae_data.binarized_test(dataset, config.eval_n))
    train_x, test_x = train_x.to(dev), test_x.to(dev)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model = VAE(config.model_config, pixel_mean=train_x.mean(0)).to(dev)
    if config.init_weights is not None:  # continue from another run's weights (fresh optimizer)
        path = Path(config.init_weights)
        _load_state(model, _read_safetensors(path)[0], path)
    objective = config.objective_spec
    params = (model.encoder_parameters(), model.decoder_parameters())
    optimizer = adam(model.parameters(), config.lr, (config.beta1, config.beta2), config.adam_eps)
    generator = torch.Generator(device=dev).manual_seed(config.seed)

    state = Progress()
    pass_start_rng = None
    if resume:
        state, pass_start_rng = load_checkpoint(out / CHECKPOINT_FILE, model, optimizer, generator, checkpoint)
        kept = read_metrics(out)[: state.passes]  # drop lines of passes after the checkpoint
        if lead:
            atomic_write(out / METRICS_FILE, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    elif lead:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (SUMMARY_FILE, METRICS_FILE, CHECKPOINT_FILE, WEIGHTS_FILE, EVALUATION_FILE, EVALUATION_IMAGES_FILE):
            (out / stale).unlink(missing_ok=True)
        shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
        write_json(out / CONFIG_FILE, config.to_dict())

    from iwae.evaluate import active_units  # evaluation imports this module for load_run

    _barrier(shard)
    board = _tensorboard(out, purge_step=state.passes if resume else None) if lead else _NoBoard()
    progress = progress and lead
    plan = [(stage, lr) for stage, passes, lr in config.schedule() for _ in range(passes)]
    stage_ends = {i for i in range(len(plan)) if i + 1 == len(plan) or plan[i + 1][0] != plan[i][0]}
    n, bs = train_x.shape[0], config.batch_size
    steps_per_pass = math.ceil(n / bs)
    interval = config.checkpoint_minutes * 60.0
    last_checkpoint = time.monotonic()
    bar = None
    record = {}

    with open(out / METRICS_FILE if lead else os.devnull, "a") as metrics:
        for p in range(state.passes, len(plan)):
            stage, lr = plan[p]
            if bar is None or state.step == 0 and plan[p - 1][0] != stage:
                if bar is not None:
                    bar.close()
                remaining = sum(1 for q in range(p, len(plan)) if plan[q][0] == stage)
                bar = _progress(remaining * steps_per_pass - state.step, progress, _stage_name(config, stage, lr))
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            if state.step == 0:
                pass_start_rng = generator.get_state()
            current_rng = generator.get_state()
            generator.set_state(pass_start_rng)  # the pass's data comes from its starting state
            batches = torch.bernoulli(train_x[torch.randperm(n, device=dev, generator=generator)], generator=generator)
            if state.step > 0:
                generator.set_state(current_rng)  # resumed mid-pass: continue the sample stream
            t0 = time.perf_counter() - state.seconds
            bound_sum = torch.tensor(state.bound_sum, dtype=torch.float64, device=dev)
            for step in range(state.step, steps_per_pass):
                xb = batches[step * bs : (step + 1) * bs]
                value, ok = train_step(model, objective, optimizer, xb, generator, params, shard)
                if ok:
                    bound_sum += value.detach() * xb.shape[0]
                    state.good_examples += xb.shape[0]
                    state.consecutive_bad = 0
                else:
                    state.skipped += 1
                    state.consecutive_bad += 1
                    if state.consecutive_bad >= config.max_bad_steps:
                        bar.close()
                        raise IwaeError(
                            f"training stopped: {state.consecutive_bad} consecutive steps with a non-finite bound or "
                            f"gradient (pass {p + 1}, step {step + 1}); the last good checkpoint is {out / CHECKPOINT_FILE}"
                        )
                bar.update(1)
                if lead and time.monotonic() - last_checkpoint > interval and step + 1 < steps_per_pass:
                    state.step, state.bound_sum = step + 1, bound_sum.item()
                    state.seconds = time.perf_counter() - t0
                    save_checkpoint(out / CHECKPOINT_FILE, model, optimizer, generator, pass_start_rng, state)
                    last_checkpoint = time.monotonic()
            seconds = time.perf_counter() - t0
            record = {
                "pass": p + 1,
                "stage": stage,
                "lr": lr,
                "train_bound": bound_sum.item() / max(state.good_examples, 1),
                "seconds": seconds,
                "skipped_steps": state.skipped,
            }
            if lead and ((p + 1) % config.eval_every == 0 or p in stage_ends):
                record.update(_test_bounds(model, test_x, config.curve_k, seed=p + 1))
            if lead and p in stage_ends and config.stage_nll_k:
                record.update(_stage_nll(model, test_x, config.stage_nll_k, seed=p + 1))
            bar.set_postfix(bound=f"{record['train_bound']:.2f}")
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            _log_pass(board, record)
            state = Progress(p + 1, consecutive_bad=state.consecutive_bad, total_seconds=state.total_seconds + seconds)
            if lead and p in stage_ends:
                save_weights(model, out / WEIGHTS_FILE)
                _log_stage(board, model, test_x, p + 1, active_units)
            if lead and (p in stage_ends or time.monotonic() - last_checkpoint > interval):
                save_checkpoint(out / CHECKPOINT_FILE, model, optimizer, generator, generator.get_state(), state)
                last_checkpoint = time.monotonic()
    if bar is not None:
        bar.close()
    board.close()
    summary = {
        "passes": len(plan),
        "train_seconds": state.total_seconds,
        "final_train_bound": record.get("train_bound"),
        "final_test_iwae64": record.get("test_iwae64"),
        "test_iwae64_n": int(test_x.shape[0]),
        "n_train": n,
        "device": str(dev),
        "processes": 1 if shard is None else shard[1],
        "torch_threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "torch": torch.__version__,
    }
    if lead:
        write_json(out / SUMMARY_FILE, summary)
    _barrier(shard)
    return summary


def _barrier(shard) -> None:
    if shard is not None:
        import torch.distributed as dist

        dist.barrier()


def _test_bounds(model: VAE, test_x: torch.Tensor, curve_k: int | None, seed: int) -> dict:
    """IWAE-64 on the test subset; with ``curve_k`` also log p-hat(x) = L_curve_k and
    -KL(Q||P) = IWAE-64 - log p-hat(x) (Rainforth et al.'s learning curves)."""
    from iwae.evaluate import iwae_bound, log_weight_reductions

    if curve_k is None:
        return {"test_iwae64": iwae_bound(model, test_x, k=64, seed=seed)}
    model.eval()
    r = log_weight_reductions(model, test_x, curve_k, k_small=64, seed=seed)
    iwae64, log_px = r["small"].double().mean().item(), r["log_px"].double().mean().item()
    return {"test_iwae64": iwae64, "test_log_px": log_px, "test_neg_kl_q_p": iwae64 - log_px}


def _stage_nll(model: VAE, test_x: torch.Tensor, k: int, seed: int) -> dict:
    """The test NLL -mean L_k on the logged test subset, for the budget ladder of the report."""
    from iwae.evaluate import iwae_bound

    return {"test_nll_subset": -iwae_bound(model, test_x, k=k, seed=seed), "test_nll_subset_k": k,
            "test_nll_subset_n": int(test_x.shape[0])}  # fmt: skip


def resume(run_dir: str | Path, dataset=None, progress: bool = True, device: str | None = None) -> dict:
    """Continue an interrupted run from its checkpoint (``iwae train --resume``)."""
    return train(load_config(run_dir), run_dir, dataset=dataset, progress=progress, device=device, resume=True)


def _stage_name(config: TrainConfig, stage: int, lr: float) -> str:
    where = f"stage {stage + 1}/{config.stages}" if config.stages else "constant rate"
    return f"{config.objective_spec} {where} lr={lr:.2e}"


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)


class _NoBoard:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _tensorboard(out: Path, purge_step: int | None):
    try:
        from tensorboardX import SummaryWriter
    except ModuleNotFoundError:
        return _NoBoard()
    return SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=purge_step)


def _log_pass(board, record: dict) -> None:
    for key in ("train_bound", "test_iwae64", "test_nll_subset", "lr", "seconds", "skipped_steps"):
        if key in record:
            board.add_scalar(key, record[key], record["pass"])


def _log_stage(board, model: VAE, test_x: torch.Tensor, passes: int, active_units) -> None:
    if isinstance(board, _NoBoard):
        return
    from iwae.report import tile_images

    model.eval()
    for layer, count in enumerate(active_units(model, test_x)):
        board.add_scalar(f"active_units/layer{layer + 1}", count, passes)
    images = model.sample_images(64, torch.Generator(device=test_x.device).manual_seed(0)).cpu().numpy()
    board.add_image("samples", tile_images(images), passes, dataformats="HW")
    board.flush()
