"""Training: Burda et al.'s optimizer and schedule, the run directory, checkpoints.

Adam (beta1 = 0.9, beta2 = 0.999, eps = 1e-4), batches of 20, and the schedule of
Burda et al. (2016, section 5): stage i = 0, 1, ..., 7 runs 3^i passes over the
training set at learning rate 1e-3 * 10^(-i/7), 3,280 passes in all. Training
images are binarized afresh, pixel ~ Bernoulli(grey value), every time they are used.

A run directory (its files and their reading and writing: :mod:`iwae.rundir`) holds the
configuration, the weights at every stage end, a checkpoint every few minutes and at every
stage end, ``metrics.jsonl`` (per pass: train bound, learning rate, seconds, skipped steps;
every few passes the IWAE-64 bound on a seeded random subset of the test set, and at every
stage end the test NLL with ``stage_nll_k`` samples on that subset), TensorBoard logs and,
written last, ``summary.json``. ``iwae train --resume RUN_DIR`` continues a run killed at
any moment from its checkpoint and ends with the same weights, bit for bit, as a run that
was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from iwae import data as iwae_data
from iwae.bounds import Objective
from iwae.errors import IwaeError, RunDirError, TimeLimitReached
from iwae.model import VAE, ModelConfig, parse_hidden, parse_latent
from iwae.rundir import (  # noqa: F401 (re-exported: iwae.train.load_run's neighbours, used by callers)
    CHECKPOINT_FILE,
    CHECKPOINT_NEXT_FILE,
    CONFIG_FILE,
    EVALUATION_FILE,
    EVALUATION_IMAGES_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    TENSORBOARD_DIR,
    WEIGHTS_FILE,
    Progress,
    checkpoint_meta,
    load_checkpoint,
    load_state,
    prepare_run_dir,
    read_evaluation_images,
    read_json,
    read_metrics,
    read_safetensors,
    save_checkpoint,
    save_weights,
    write_evaluation,
    write_json,
    write_metrics,
)

DATASETS = iwae_data.DATASETS  # the built-in sets
BINARIZE = ("dynamic", "none")


@dataclass
class TrainConfig:
    """Everything that determines a training run; stored as ``config.json``.

    The keys are the long options of ``iwae train`` with ``-`` written ``_``. ``dataset``
    is ``mnist``, ``omniglot`` or the path of the user's own data; ``image_shape``,
    ``dataset_path`` (absolute) and ``dataset_sha256`` record the data the run was
    trained on (filled in by :meth:`for_data`; 28x28 and None for the built-in sets).
    The architecture is ``layers`` (Burda et al.'s presets) or ``latent`` and ``hidden``
    (any sizes; ``layers`` then is their length), resolved into ``model``.
    """

    dataset: str = "mnist"
    layers: int | None = None
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
    latent: list | str | None = None
    hidden: list | str | None = None
    binarize: str | None = None
    image_shape: list | None = None
    dataset_path: str | None = None
    dataset_sha256: str | None = None

    def __post_init__(self):
        self._check_types()
        if not self.dataset:
            raise IwaeError(
                "dataset must be mnist, omniglot or the path of a dataset, got an empty name"
            )
        if self.dataset.lower() in DATASETS:
            self.dataset = self.dataset.lower()
        if self.binarize is not None and self.binarize not in BINARIZE:
            raise IwaeError(f"binarize must be one of {', '.join(BINARIZE)}, got {self.binarize!r}")
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
            raise IwaeError(
                f"curve_k must be >= 64 (IWAE-64 uses its first 64 samples), got {self.curve_k}"
            )
        if not self.checkpoint_minutes > 0:
            raise IwaeError(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")
        if not (self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.adam_eps > 0):
            raise IwaeError("Adam needs lr > 0, 0 <= beta1, beta2 < 1 and eps > 0")
        self.objective_spec  # validates objective, k, m, beta, estimator
        self._resolve_architecture()

    def _resolve_architecture(self) -> None:
        """``latent``/``hidden`` and ``layers`` (:meth:`_resolve_layers`); ``image_shape``
        28x28 for the built-in sets; ``model`` built from them once the image shape is known
        (for a dataset from files, by :meth:`for_data`), and checked."""
        self._resolve_layers()
        if self.image_shape is None and self.dataset in DATASETS:
            self.image_shape = [iwae_data.IMAGE_SIDE, iwae_data.IMAGE_SIDE]
        if self.image_shape is not None:
            if not (
                1 <= len(self.image_shape) <= 2
                and all(isinstance(d, int) and d >= 1 for d in self.image_shape)
            ):
                raise IwaeError(
                    f"image_shape must be [H, W] or [D] of positive integers, got {self.image_shape!r}"
                )
            self.image_shape = list(self.image_shape)
        if not self.model and self.image_shape is not None:
            self.model = self.architecture(math.prod(self.image_shape)).to_dict()
        if self.model:
            self.model_config  # validates the architecture
        else:
            self.architecture(1)  # validates the layers; the input size comes with the data

    def _resolve_layers(self) -> None:
        """``latent`` and ``hidden`` (lists, or text as on the command line) parsed and
        checked; ``layers`` their number (an explicit ``layers`` must agree), else 1."""
        if (self.latent is None) != (self.hidden is None):
            raise IwaeError(
                "--latent and --hidden go together: give both (e.g. --latent 100,50 "
                "--hidden 200x200,100x100) or neither (--layers 1|2)"
            )
        if self.latent is None:
            self.layers = 1 if self.layers is None else self.layers
            return
        latent = parse_latent(self.latent) if isinstance(self.latent, str) else self.latent
        hidden = parse_hidden(self.hidden) if isinstance(self.hidden, str) else self.hidden
        if (
            isinstance(latent, (list, tuple))
            and isinstance(hidden, (list, tuple))
            and len(latent) != len(hidden)
        ):
            raise IwaeError(
                f"--latent has {len(latent)} entries and --hidden {len(hidden)}: give one list of "
                "hidden layers per stochastic layer, e.g. --latent 100,50 --hidden 200x200,100x100"
            )
        try:
            checked = ModelConfig(
                x_dim=1, latent=latent, hidden=hidden, scale=self.scale
            )  # sizes and counts
        except (TypeError, ValueError):
            raise IwaeError(
                f"latent must be a list of sizes and hidden a list of lists of sizes, got latent="
                f"{self.latent!r} hidden={self.hidden!r}"
            ) from None
        self.latent, self.hidden = list(checked.latent), [list(h) for h in checked.hidden]
        if self.layers is not None and self.layers != len(self.latent):
            plural = "s" if len(self.latent) > 1 else ""
            raise IwaeError(
                f"--layers {self.layers} disagrees with --latent {','.join(map(str, self.latent))} "
                f"({len(self.latent)} stochastic layer{plural}): give one or the other"
            )
        self.layers = len(self.latent)

    def architecture(self, x_dim: int) -> ModelConfig:
        """The model of ``latent``/``hidden`` (or of the ``layers`` preset) for ``x_dim`` pixels."""
        if self.latent is not None:
            return ModelConfig(
                x_dim=x_dim, latent=self.latent, hidden=self.hidden, scale=self.scale
            )
        return ModelConfig.preset(self.layers, x_dim=x_dim, scale=self.scale)

    def for_data(self, dataset: iwae_data.Dataset) -> TrainConfig:
        """This configuration with ``dataset``'s image shape, path and content hash recorded
        (and ``model`` built for its pixels if it was not given); checks that ``model``'s
        input size fits the images and that ``binarize`` suits them."""
        if math.prod(dataset.image_shape) != dataset.x_dim:
            raise IwaeError(
                f"dataset {dataset.name}: image_shape {list(dataset.image_shape)} does not hold its "
                f"{dataset.x_dim} pixels per image"
            )
        if self.binarize == "none" and not dataset.binary:
            raise IwaeError(
                f"--binarize none: the training images of {dataset.name} are grey (not all 0 or 1), "
                "and the Bernoulli decoder needs binary images: use --binarize dynamic"
            )
        config = TrainConfig.from_dict(
            {
                **self.to_dict(),
                "image_shape": list(dataset.image_shape),
                "dataset_path": dataset.path,
                "dataset_sha256": dataset.sha256,
            }
        )
        if config.model_config.x_dim != dataset.x_dim:
            raise IwaeError(
                f"the model takes {config.model_config.x_dim} pixels (model.x_dim), but the images of "
                f"{dataset.name} have {dataset.x_dim} ({'x'.join(map(str, dataset.image_shape))})"
            )
        return config

    def _check_types(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                ok = (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                )
                if ok:
                    setattr(self, f.name, float(value))
            elif kind.startswith("str"):
                ok = isinstance(value, str)
            elif kind == "bool":
                ok = isinstance(value, bool)
            elif kind.startswith("list"):
                ok = isinstance(value, (list, tuple)) or ("str" in kind and isinstance(value, str))
            else:
                ok = isinstance(value, dict)
            if not ok:
                raise IwaeError(f"{f.name} must be of type {kind}, got {value!r}")

    @property
    def objective_spec(self) -> Objective:
        return Objective(self.objective, self.k, self.m, self.beta, self.estimator)

    @property
    def model_config(self) -> ModelConfig:
        if not self.model:
            raise IwaeError(
                f"the model's input size is not known before the data of {self.dataset} is read"
            )
        return ModelConfig.from_dict(self.model)

    def schedule(self) -> list[tuple[int, int, float]]:
        """(stage, passes, learning rate) for each stage."""
        if self.epochs is not None:
            return [(0, self.epochs, self.lr)]
        return [(i, 3**i, self.lr * 10 ** (-i / 7)) for i in range(self.stages)]

    @property
    def rows_per_step(self) -> int:
        """(example, sample) rows a training step computes: batch size x samples per example
        (M*K). What the thread count and lockstep grouping are chosen by."""
        return self.batch_size * self.objective_spec.samples

    @property
    def total_passes(self) -> int:
        return sum(p for _, p, _ in self.schedule())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise IwaeError(
                f"a configuration must be a table of keys and values, got {type(d).__name__}"
            )
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
        raise IwaeError(
            f"configuration file {path} is not valid {suffix[1:].upper()}: {e}".replace("\n", " ")
        ) from None
    if not isinstance(d, dict):
        raise IwaeError(f"configuration file {path} must hold a table of keys and values")
    return d


def load_config(run_dir: str | Path) -> TrainConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    try:
        return TrainConfig.from_dict(read_json(run_dir / CONFIG_FILE))
    except RunDirError:
        raise
    except IwaeError as e:
        raise RunDirError(f"{run_dir / CONFIG_FILE}: {e}") from None


def run_dataset(
    config: TrainConfig,
    dataset: str | None = None,
    data_dir: str | None = None,
    check_hash: bool = True,
) -> iwae_data.Dataset:
    """The data of a trained run: ``dataset`` (a built-in name or a path) if given, else the
    one it was trained on (``dataset_path``, or the built-in set from ``data_dir``, else the
    run's own data directory). With ``check_hash`` it must be that data: the same content
    hash for data from files, the same name for a built-in set; otherwise an
    :class:`IwaeError` (``iwae evaluate --ignore-dataset-hash`` skips this check). Its
    images must have the model's number of pixels in any case."""
    source = dataset or config.dataset_path or config.dataset
    data = iwae_data.load_dataset(source, data_dir or config.data_dir)
    if check_hash:
        if config.dataset_sha256 is not None and data.sha256 != config.dataset_sha256:
            raise IwaeError(
                f"{source}: not the data the run was trained on: its content sha256 is {data.sha256}, "
                f"config.json records {config.dataset_sha256} (from {config.dataset_path}); pass "
                "--ignore-dataset-hash to use it anyway"
            )
        if config.dataset_sha256 is None and data.name != config.dataset:
            raise IwaeError(
                f"{source}: the run was trained on {config.dataset}; pass --ignore-dataset-hash "
                "to use other data anyway"
            )
    if data.x_dim != config.model_config.x_dim:
        raise IwaeError(
            f"{source}: images of {data.x_dim} pixels ({'x'.join(map(str, data.image_shape))}), "
            f"but the run's model takes {config.model_config.x_dim}"
        )
    return data


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[TrainConfig, VAE]:
    """The configuration and trained model of a run directory. Reads JSON and
    safetensors only: nothing in a run directory is executed."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    model = VAE(config.model_config)
    path = run_dir / WEIGHTS_FILE
    if not path.exists():
        raise RunDirError(f"{path} is missing: the run has not finished its first stage yet")
    load_state(model, read_safetensors(path)[0], path)
    return config, model.to(device)


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
    moments and its step count as they were (:func:`_step_if_finite`). ``params`` is the pair
    (encoder parameters, decoder parameters); pass it to avoid rebuilding the lists.
    ``noise``: an explicit source of the samples' noise (:data:`iwae.model.Noise`) in place
    of ``generator`` (a CUDA graph's static noise, :class:`iwae.cudagraph.ReplayedNoise`).

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
        value = objective.backward(
            objective.log_weights(model, x, generator, noise=noise), enc, dec
        )
    else:
        value = _sharded_backward(model, objective, x, generator, enc, dec, *shard)
    return value, _step_if_finite(optimizer, value, enc + dec)


def _step_if_finite(optimizer, value: torch.Tensor, params: list) -> torch.Tensor:
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


def _sharded_backward(
    model, objective, x, generator, enc, dec, rank: int, world: int
) -> torch.Tensor:
    import torch.distributed as dist

    from iwae.model import BatchShard

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
    cuda_graphs: str = "auto",
    stop_at: float | None = None,
) -> dict:
    """Train a model as ``config`` says in the run directory ``out``, or with
    ``resume=True`` continue the run there from its checkpoint.

    ``dataset`` may be given directly (tests use small synthetic sets); otherwise it
    is loaded from ``config.data_dir``. ``cuda_graphs``: "auto" replays each step from a
    CUDA graph on a (single-process) CUDA run, "off" never (:mod:`iwae.cudagraph`; the same
    numbers either way). ``stop_at``: a wall-clock time (``time.time()``) at which training
    stops, after the step or pass in progress, with a checkpoint (:class:`TimeLimitReached`).
    Returns the summary that is also written to ``summary.json``.
    """
    out = Path(out)
    if resume and (out / SUMMARY_FILE).exists():
        return read_json(out / SUMMARY_FILE)
    run = _open_run(config, out, dataset, overwrite, device, resume, cuda_graphs)
    run.stop_at = _check_stop_at(stop_at, run.shard)
    bar, record = None, {}
    try:
        with open(out / METRICS_FILE if run.lead else os.devnull, "a") as metrics:
            for p in range(run.state.passes, len(run.plan)):
                bar = _stage_bar(run, p, bar, progress)
                record = _run_pass(run, p, bar)
                up = _time_up(run)
                _end_pass(run, p, record, metrics, checkpoint=up)
                if up and p + 1 < len(run.plan):
                    raise TimeLimitReached(_stopped_message([run]))
    finally:
        if bar is not None:
            bar.close()
        run.board.close()
    return _finish_run(run, record)


def _check_stop_at(stop_at: float | None, shard) -> float | None:
    if stop_at is not None and shard is not None:
        raise IwaeError(
            "--time-limit is not supported under torchrun (the processes would stop at different steps)"
        )
    return stop_at


def time_limit_passed(stop_at: float | None) -> bool:
    """The wall-clock time ``stop_at`` (``time.time()``; None: no limit) has passed."""
    return stop_at is not None and time.time() >= stop_at


def _time_up(run: _Run) -> bool:
    """The run's time limit has passed (:func:`train`'s ``stop_at``)."""
    return time_limit_passed(run.stop_at)


def _mid_pass_checkpoint(run: _Run) -> tuple[bool, bool]:
    """(the time limit has passed, a checkpoint is due): at the limit, or when
    ``checkpoint_minutes`` have passed since the last checkpoint."""
    up = _time_up(run)
    return up, up or time.monotonic() - run.last_checkpoint > run.config.checkpoint_minutes * 60


def _stopped_message(runs: list[_Run]) -> str:
    s = runs[0].state
    where = f"pass {s.passes + 1}, step {s.step}" if s.step else f"the end of pass {s.passes}"
    names = ", ".join(str(r.out) for r in runs)
    return (
        f"time limit reached: {names} checkpointed at {where} of {len(runs[0].plan)}; "
        f"the same command (or iwae train --resume RUN) continues"
    )


@dataclass
class _Run:
    """An open training run: what its passes read and change."""

    config: TrainConfig
    out: Path
    lead: bool  # writes the files (rank 0 under torchrun)
    shard: tuple[int, int] | None
    model: VAE
    objective: Objective
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    train_x: torch.Tensor
    test_x: torch.Tensor
    state: Progress
    pass_start_rng: torch.Tensor | None
    board: object
    plan: list[tuple[int, float]]  # (stage, learning rate) of every pass
    stage_ends: set[int]  # passes that end a stage
    last_checkpoint: float = field(default_factory=time.monotonic)
    binarize: bool = True  # draw binary training images afresh (False: the images are 0/1 already)
    graphs: bool = False  # steps replayed from CUDA graphs (:mod:`iwae.cudagraph`)
    stop_at: float | None = None  # wall-clock time at which training stops (train's stop_at)
    _steps: object = None

    @property
    def graph_failure(self) -> str | None:
        """Why the run's CUDA-graph capture failed (its steps then ran eagerly), else None."""
        return getattr(self._steps, "failed", None)

    @property
    def params(self) -> tuple[list, list]:
        return self.model.encoder_parameters(), self.model.decoder_parameters()

    def step(self, xb: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step on the batch ``xb``: :func:`train_step`, or where the run uses
        CUDA graphs the same step replayed from a graph (the same noise, drawn from the
        same generator: :class:`iwae.cudagraph.GraphedSteps`)."""
        if not self.graphs:
            return train_step(
                self.model, self.objective, self.optimizer, xb, self.generator, params, self.shard
            )
        if self._steps is None:
            from iwae.cudagraph import GraphedSteps

            def body(x, noise):
                return train_step(
                    self.model, self.objective, self.optimizer, x, params=params, noise=noise
                )

            self._steps = GraphedSteps(
                body, xb.device, _generator_noise(self.generator), xb.device.type == "cuda"
            )
        return self._steps(xb)


def _generator_noise(generator: torch.Generator):
    """The noise a step draws with ``generator`` (as :meth:`iwae.model.GaussianLayer.rsample`
    does), as a :data:`iwae.model.Noise`."""

    def draw(shape, dtype, device) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)

    return draw


#: ``--cuda-graphs`` choices: auto (on for a single-process CUDA run), off
CUDA_GRAPHS = ("auto", "off")


def use_cuda_graphs(cuda_graphs: str, dev: torch.device, shard) -> bool:
    """Whether a run on ``dev`` replays its steps from CUDA graphs (``--cuda-graphs``)."""
    if cuda_graphs not in CUDA_GRAPHS:
        raise IwaeError(
            f"unknown --cuda-graphs {cuda_graphs!r}: choose one of {', '.join(CUDA_GRAPHS)}"
        )
    return cuda_graphs == "auto" and dev.type == "cuda" and shard is None


def _open_run(
    config: TrainConfig,
    out: Path,
    dataset,
    overwrite: bool,
    device,
    resume: bool,
    cuda_graphs: str = "auto",
) -> _Run:
    """Check the run directory, load the data, build the model and optimizer, and start the
    run's files, or restore all of it from the checkpoint. A run resumed before its first
    checkpoint (a ``config.json`` and no checkpoint) starts again from the beginning: with
    the same configuration it is the same run, and its partial files are replaced."""
    shard, dev = distributed_setup(pick_device(device))
    graphs = use_cuda_graphs(cuda_graphs, dev, shard)
    lead = shard is None or shard[0] == 0
    if resume and not (out / CHECKPOINT_FILE).exists():
        if not (out / CONFIG_FILE).exists():
            raise RunDirError(
                f"{out / CHECKPOINT_FILE} is missing: nothing to resume (start the run again without --resume)"
            )
        resume, overwrite = (
            False,
            True,
        )  # killed before its first checkpoint: the same run, started again
    if not resume and lead:
        prepare_run_dir(out, overwrite)
    checkpoint = (
        read_safetensors(out / CHECKPOINT_FILE) if resume else None
    )  # a bad file fails before the data loads
    if dataset is None:  # resumed: from the recorded absolute path, whatever the working directory
        dataset = iwae_data.load_dataset(
            config.dataset_path or config.dataset, config.data_dir, validation=config.validation
        )
    if resume and config.dataset_sha256 != dataset.sha256:
        raise RunDirError(
            f"{dataset.name} is not the data {out} was trained on (content sha256 {dataset.sha256}, "
            f"{out / CONFIG_FILE} records {config.dataset_sha256}): the run cannot be resumed on it"
        )
    config = config.for_data(dataset)
    train_x, test_x = _images(config, dataset, dev)
    model, optimizer, generator = _fresh_state(config, train_x, dev, capturable=graphs)
    state, pass_start_rng = Progress(), None
    if resume:
        state, pass_start_rng = load_checkpoint(
            out / CHECKPOINT_FILE, model, optimizer, generator, checkpoint
        )
        if lead:
            write_metrics(
                out, read_metrics(out)[: state.passes]
            )  # drop lines of passes after the checkpoint
    elif lead:
        _start_run_dir(out, config)
    _barrier(shard)
    board = _tensorboard(out, purge_step=state.passes if resume else None) if lead else _NoBoard()
    plan = [(stage, lr) for stage, passes, lr in config.schedule() for _ in range(passes)]
    stage_ends = {i for i in range(len(plan)) if i + 1 == len(plan) or plan[i + 1][0] != plan[i][0]}
    return _Run(
        config,
        out,
        lead,
        shard,
        model,
        config.objective_spec,
        optimizer,
        generator,
        train_x,
        test_x,
        state,
        pass_start_rng,
        board,
        plan,
        stage_ends,
        binarize=not dataset.binary,
        graphs=graphs,
    )


def _images(
    config: TrainConfig, dataset: iwae_data.Dataset, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grey training images (checked) and the binarized test subset of the logged bounds."""
    train_x = torch.tensor(
        dataset.train, dtype=torch.float32
    )  # a copy: the loaded arrays are read-only
    if config.n_train is not None:
        train_x = train_x[: config.n_train]
    if not (torch.isfinite(train_x).all() and train_x.min() >= 0 and train_x.max() <= 1):
        raise IwaeError(
            f"training images of {dataset.name} must be grey values in [0, 1] (found NaN, inf or others)"
        )
    test_x = torch.from_numpy(iwae_data.binarized_test(dataset, config.eval_n))
    return train_x.to(dev), test_x.to(dev)


def _fresh_state(
    config: TrainConfig, train_x: torch.Tensor, dev: torch.device, capturable: bool = False
):
    """Seeded model (or another run's weights, ``init_weights``), Adam (``capturable`` for
    CUDA graphs: :func:`adam`) and the run's generator."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model = VAE(config.model_config, pixel_mean=train_x.mean(0)).to(dev)
    if config.init_weights is not None:  # continue from another run's weights (fresh optimizer)
        path = Path(config.init_weights)
        load_state(model, read_safetensors(path)[0], path)
    optimizer = adam(
        model.parameters(),
        config.lr,
        (config.beta1, config.beta2),
        config.adam_eps,
        capturable=capturable,
    )
    return model, optimizer, torch.Generator(device=dev).manual_seed(config.seed)


def _start_run_dir(out: Path, config: TrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in (
        SUMMARY_FILE,
        METRICS_FILE,
        CHECKPOINT_FILE,
        WEIGHTS_FILE,
        EVALUATION_FILE,
        EVALUATION_IMAGES_FILE,
    ):
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
    write_json(out / CONFIG_FILE, config.to_dict())


def _stage_bar(run: _Run, p: int, bar, enabled: bool):
    """The progress bar of pass ``p``'s stage: a new one when a stage starts."""
    stage, lr = run.plan[p]
    if bar is not None and not (run.state.step == 0 and run.plan[p - 1][0] != stage):
        return bar
    if bar is not None:
        bar.close()
    remaining = sum(1 for q in range(p, len(run.plan)) if run.plan[q][0] == stage)
    steps = math.ceil(run.train_x.shape[0] / run.config.batch_size)
    return _progress(
        remaining * steps - run.state.step, enabled and run.lead, _stage_name(run.config, stage, lr)
    )


#: steps between host reads of the non-finite-step count (the count itself stays on the device)
GUARD_EVERY = 100


class _PassTotals:
    """The pass's running sums of one run or of a lockstep group's runs ([G] each), on the
    device: bound x examples over good steps, good examples, skipped steps, the current and
    the longest run of consecutive skipped steps."""

    def __init__(self, states: list[Progress], dev: torch.device):
        def t(field_, dtype=torch.float64):
            return torch.tensor(
                [float(getattr(st, field_)) for st in states], dtype=dtype, device=dev
            )

        self.bound_sum, self.good = t("bound_sum"), t("good_examples")
        self.skipped, self.consecutive = (
            t("skipped", torch.float32),
            t("consecutive_bad", torch.float32),
        )
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
            st.bound_sum, st.good_examples, st.skipped, st.consecutive_bad = (
                sums[g],
                int(good[g]),
                int(skipped[g]),
                int(consecutive[g]),
            )

    def stuck(self, max_bad_steps: int) -> bool:
        return bool((self.longest >= max_bad_steps).any())


def _pass_batches(run: _Run) -> torch.Tensor:
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


def _run_pass(run: _Run, p: int, bar) -> dict:
    """The steps of pass ``p`` (from ``run.state.step`` when resumed mid-pass), with
    checkpoints every ``checkpoint_minutes``; returns the pass's metrics record."""
    config, state = run.config, run.state
    stage, lr = run.plan[p]
    set_lr(run.optimizer, lr)
    run.model.train()
    batches = _pass_batches(run)
    bs, steps = config.batch_size, math.ceil(run.train_x.shape[0] / config.batch_size)
    t0 = time.perf_counter() - state.seconds
    totals = _PassTotals([state], run.train_x.device)
    params = run.params
    for step in range(state.step, steps):
        xb = batches[step * bs : (step + 1) * bs]
        value, skipped = run.step(xb, params)
        totals.add(value, skipped, xb.shape[0])
        bar.update(1)
        if (step + 1) % GUARD_EVERY == 0 or step + 1 == steps:
            _stop_if_stuck(run, totals, p, step)
        up, due = _mid_pass_checkpoint(run)
        if run.lead and due and step + 1 < steps:
            totals.into([state])
            state.step, state.seconds = step + 1, time.perf_counter() - t0
            _checkpoint(run, run.pass_start_rng)
            if up:
                raise TimeLimitReached(_stopped_message([run]))
    totals.into([state])
    return _pass_record(p, stage, lr, state, time.perf_counter() - t0)


def _pass_record(p: int, stage: int, lr: float, state: Progress, seconds: float) -> dict:
    """The metrics line of pass ``p`` (before its test bounds are added)."""
    return {
        "pass": p + 1,
        "stage": stage,
        "lr": lr,
        "train_bound": state.bound_sum / max(state.good_examples, 1),
        "seconds": seconds,
        "skipped_steps": state.skipped,
    }


def _stop_if_stuck(run: _Run, totals: _PassTotals, p: int, step: int) -> None:
    if totals.stuck(run.config.max_bad_steps):
        raise IwaeError(
            f"training stopped: at least {run.config.max_bad_steps} consecutive steps with a non-finite bound or "
            f"gradient (pass {p + 1}, by step {step + 1}); the last good checkpoint is {run.out / CHECKPOINT_FILE}"
        )


def _checkpoint(run: _Run, pass_start_rng: torch.Tensor) -> None:
    save_checkpoint(
        run.out / CHECKPOINT_FILE,
        run.model,
        run.optimizer,
        run.generator,
        pass_start_rng,
        run.state,
    )
    run.last_checkpoint = time.monotonic()


def _end_pass(run: _Run, p: int, record: dict, metrics, checkpoint: bool = False) -> None:
    """The test bounds due after pass ``p``, its metrics line, and at a stage end the weights
    and a checkpoint (else a checkpoint when ``checkpoint_minutes`` have passed, or when
    ``checkpoint`` asks for one)."""
    _record_pass(run, p, record, metrics)
    if run.lead and (checkpoint or _checkpoint_due(run, p)):
        _checkpoint(run, run.generator.get_state())


def _checkpoint_due(run: _Run, p: int) -> bool:
    return (
        p in run.stage_ends
        or time.monotonic() - run.last_checkpoint > run.config.checkpoint_minutes * 60
    )


def _record_pass(run: _Run, p: int, record: dict, metrics) -> None:
    """The test bounds due after pass ``p``, its metrics line, and at a stage end the weights."""
    config, stage_end = run.config, p in run.stage_ends
    if run.lead and ((p + 1) % config.eval_every == 0 or stage_end):
        record.update(_test_bounds(run.model, run.test_x, config.curve_k, seed=p + 1))
    if run.lead and stage_end and config.stage_nll_k:
        record.update(_stage_nll(run.model, run.test_x, config.stage_nll_k, seed=p + 1))
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    _log_pass(run.board, record)
    run.state = Progress(
        p + 1,
        consecutive_bad=run.state.consecutive_bad,
        total_seconds=run.state.total_seconds + record["seconds"],
    )
    if run.lead and stage_end:
        save_weights(run.model, run.out / WEIGHTS_FILE)
        _log_stage(run.board, run.model, run.test_x, p + 1, run.config.image_shape)


def _finish_run(run: _Run, record: dict) -> dict:
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
        "cuda_graphs": run.graphs and run.graph_failure is None,
        "torch": torch.__version__,
    }
    if run.graph_failure is not None:  # the steps ran eagerly: say why
        summary["cuda_graph_failure"] = run.graph_failure
    if run.lead:
        write_json(run.out / SUMMARY_FILE, summary)
    _barrier(run.shard)
    return summary


# -- lockstep: a group of runs trained side by side in one process ------------------------

#: configuration keys that must agree for runs to share a lockstep group: the data, the
#: architecture, the samples drawn per example, the schedule and Adam's settings (the
#: objective, its estimator family aside, the seed and what is logged may differ)
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
)


def lockstep_key(config: TrainConfig) -> tuple:
    """Runs with equal keys can be trained in lockstep (:func:`train_lockstep`)."""
    spec = config.objective_spec
    return (
        *(json.dumps(getattr(config, k), sort_keys=True) for k in LOCKSTEP_KEYS),
        spec.samples,
        spec.stops_q,
    )


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
    Checkpoints are written for all runs at once, in two phases (:func:`_group_checkpoint`),
    so that a killed group resumes (``resume=True``) bit for bit. ``stop_at``: as
    :func:`train`'s, for the whole group. Returns the summaries.
    """
    outs = [Path(o) for o in outs]
    if len({lockstep_key(c) for c in configs}) != 1:
        raise IwaeError(
            "runs trained in lockstep must share the data, architecture, samples per example, "
            "estimator family, schedule and Adam settings"
        )
    if resume:
        for out in outs:
            settle_group_checkpoint(out)
    if resume and all((o / SUMMARY_FILE).exists() for o in outs):
        return [read_json(o / SUMMARY_FILE) for o in outs]
    runs = [
        _open_run(c, o, dataset, overwrite, device, resume, cuda_graphs)
        for c, o in zip(configs, outs)
    ]
    if len({(r.state.passes, r.state.step) for r in runs}) != 1 or any(r.shard for r in runs):
        raise IwaeError(
            "runs resumed in lockstep must stand at the same step of their schedule (resume them one by one)"
        )
    for run in runs:
        run.stop_at = stop_at
    group = _Group(runs)
    bar, records = None, [{} for _ in runs]
    metrics = [open(r.out / METRICS_FILE, "a") for r in runs]
    try:
        for p in range(runs[0].state.passes, len(runs[0].plan)):
            bar = _stage_bar(runs[0], p, bar, progress)
            records = group.run_pass(p, bar)
            group.to_members()
            for run, record, f in zip(runs, records, metrics):
                _record_pass(run, p, record, f)
            up = _time_up(runs[0])
            if up or _checkpoint_due(runs[0], p):
                _group_checkpoint(runs, [r.generator.get_state() for r in runs])
            if up and p + 1 < len(runs[0].plan):
                raise TimeLimitReached(_stopped_message(runs))
    finally:
        for f in metrics:
            f.close()
        if bar is not None:
            bar.close()
        for run in runs:
            run.board.close()
    for run in runs:  # the group's graphs are the members' graphs
        run._steps = group.graphed
    return [_finish_run(run, record) for run, record in zip(runs, records)]


class LockstepStep:
    """The training step of G models side by side: ``models[g]`` (copied into one stacked
    VAE) with objective ``objectives[g]`` and noise from ``generators[g]``, one fused Adam
    over the stacked parameters. ``step(xb)`` with ``xb`` [G, B, D] is every model's
    :func:`train_step` on its own batch ``xb[g]`` in one batched forward and backward."""

    def __init__(
        self,
        models: list[VAE],
        objectives: list[Objective],
        generators: list[torch.Generator],
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-4,
        graphs: bool = False,
    ):
        self.model = VAE.stack(models)
        self.optimizer = adam(self.model.parameters(), lr, betas, eps, capturable=graphs)
        self.objectives = objectives
        self.stop_q = objectives[0].stops_q
        self.noise = StackedNoise(generators)
        self.params = (self.model.encoder_parameters(), self.model.decoder_parameters())
        self.graphed = None
        if graphs:  # the same steps replayed from CUDA graphs (:mod:`iwae.cudagraph`)
            from iwae.cudagraph import GraphedSteps

            device = self.model.output_layer.weight.device
            self.graphed = GraphedSteps(
                self._step, device, self.noise, capture=device.type == "cuda"
            )

    def step(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of every model on its batch ``xb[g]``: (bounds [G], skipped)."""
        return self._step(xb, self.noise) if self.graphed is None else self.graphed(xb)

    def _step(self, xb: torch.Tensor, noise) -> tuple[torch.Tensor, torch.Tensor]:
        from iwae.bounds import backward_stacked

        enc, dec = self.params
        self.optimizer.zero_grad(set_to_none=True)
        log_w = self.model.log_weights(
            xb, self.objectives[0].samples, stop_q=self.stop_q, noise=noise
        )
        values = backward_stacked(self.objectives, log_w, enc, dec)
        return values, _step_if_finite(self.optimizer, values, enc + dec)


class _Group(LockstepStep):
    """A lockstep group of open runs: the stacked step, the copies to and from the runs'
    own models and optimizers, and the group's passes."""

    def __init__(self, runs: list[_Run]):
        c = runs[0].config
        super().__init__(
            [r.model for r in runs],
            [r.objective for r in runs],
            [r.generator for r in runs],
            c.lr,
            (c.beta1, c.beta2),
            c.adam_eps,
            graphs=runs[0].graphs,
        )
        self.runs = runs
        if runs[0].optimizer.state:  # resumed: the members' Adam moments, stacked
            self._stack_adam_state()

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

    def run_pass(self, p: int, bar) -> list[dict]:
        """Pass ``p`` of every member, side by side; returns their metrics records."""
        runs, config = self.runs, self.runs[0].config
        stage, lr = runs[0].plan[p]
        set_lr(self.optimizer, lr)
        self.model.train()
        batches = [_pass_batches(r) for r in runs]
        bs, steps = config.batch_size, math.ceil(runs[0].train_x.shape[0] / config.batch_size)
        start = runs[0].state.step
        t0 = time.perf_counter() - runs[0].state.seconds
        totals = _PassTotals([r.state for r in runs], runs[0].train_x.device)
        for step in range(start, steps):
            xb = torch.stack([b[step * bs : (step + 1) * bs] for b in batches])
            values, skipped = self.step(xb)
            totals.add(values, skipped, xb.shape[1])
            bar.update(1)
            if (step + 1) % GUARD_EVERY == 0 or step + 1 == steps:
                _stop_if_stuck(runs[0], totals, p, step)
            up, due = _mid_pass_checkpoint(runs[0])
            if due and step + 1 < steps:
                self.to_members()
                totals.into([r.state for r in runs])
                for run in runs:
                    run.state.step, run.state.seconds = step + 1, time.perf_counter() - t0
                _group_checkpoint(runs, [r.pass_start_rng for r in runs])
                if up:
                    raise TimeLimitReached(_stopped_message(runs))
        seconds = time.perf_counter() - t0
        totals.into([r.state for r in runs])
        return [_pass_record(p, stage, lr, run.state, seconds) for run in runs]


def _group_checkpoint(runs: list[_Run], pass_start_rngs: list[torch.Tensor]) -> None:
    """Checkpoints of every run of a lockstep group, in two phases: each run's new checkpoint
    goes to ``checkpoint.next.safetensors`` (naming the group), and only when all are written
    do they replace the current ones. :func:`settle_group_checkpoint` finishes or undoes an
    interrupted write, so that the runs of a group always resume from one common step."""
    for run, rng in zip(runs, pass_start_rngs):
        group = [
            os.path.relpath(r.out, run.out) for r in runs
        ]  # relative: the directories may move
        save_checkpoint(
            run.out / CHECKPOINT_NEXT_FILE,
            run.model,
            run.optimizer,
            run.generator,
            rng,
            run.state,
            group,
        )
    for run in runs:
        os.replace(run.out / CHECKPOINT_NEXT_FILE, run.out / CHECKPOINT_FILE)
        run.last_checkpoint = time.monotonic()


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
            if complete:
                os.replace(d / CHECKPOINT_NEXT_FILE, d / CHECKPOINT_FILE)
            else:
                (d / CHECKPOINT_NEXT_FILE).unlink()


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

    return {
        "test_nll_subset": -iwae_bound(model, test_x, k=k, seed=seed),
        "test_nll_subset_k": k,
        "test_nll_subset_n": int(test_x.shape[0]),
    }


def resume(
    run_dir: str | Path,
    dataset=None,
    progress: bool = True,
    device: str | None = None,
    cuda_graphs: str = "auto",
    data_dir: str | None = None,
    stop_at: float | None = None,
) -> dict:
    """Continue an interrupted run from its checkpoint (``iwae train --resume``); a run killed
    before its first checkpoint starts again from its ``config.json`` (the same weights, bit
    for bit, as a run never interrupted). ``data_dir``: where the data is now, if not where
    the run was trained (another machine); a file dataset is still checked by its hash."""
    return train(
        resume_config(run_dir, data_dir),
        run_dir,
        dataset=dataset,
        progress=progress,
        device=device,
        resume=True,
        cuda_graphs=cuda_graphs,
        stop_at=stop_at,
    )


def resume_config(run_dir: str | Path, data_dir: str | None = None) -> TrainConfig:
    """The configuration a run continues with: its own, read from the data directory
    ``data_dir`` where one is given (the data directory is not part of what a run computes)."""
    config = load_config(run_dir)
    return config if data_dir is None else replace(config, data_dir=str(data_dir))


def _stage_name(config: TrainConfig, stage: int, lr: float) -> str:
    where = f"stage {stage + 1}/{config.stages}" if config.stages else "constant rate"
    return f"{config.objective_spec} {where} lr={lr:.2e}"


def _progress(total: int, enabled: bool, desc: str):
    from iwae.progress import progress_bar

    return progress_bar(total, desc, "step", enabled=enabled, mininterval=0.5)


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


def _log_stage(board, model: VAE, test_x: torch.Tensor, passes: int, image_shape=None) -> None:
    if isinstance(board, _NoBoard):
        return
    from iwae.data import tile_images
    from iwae.evaluate import active_units  # evaluation imports this module for load_run

    model.eval()
    for layer, count in enumerate(active_units(model, test_x)):
        board.add_scalar(f"active_units/layer{layer + 1}", count, passes)
    images = (
        model.sample_images(64, torch.Generator(device=test_x.device).manual_seed(0)).cpu().numpy()
    )
    board.add_image("samples", tile_images(images, shape=image_shape), passes, dataformats="HW")
    board.flush()
