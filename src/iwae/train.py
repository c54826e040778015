"""Training: Burda et al.'s optimizer and schedule, and the run directory.

Adam (beta1 = 0.9, beta2 = 0.999, eps = 1e-4), batches of 20, and the schedule of
Burda et al. (2016, section 5): stage i = 0, 1, ..., 7 runs 3^i passes over the
training set at learning rate 1e-3 * 10^(-i/7), 3,280 passes in all. Training
images are binarized afresh, pixel ~ Bernoulli(grey value), every time they are used.

A run directory holds

- ``config.json``    the resolved configuration (everything needed to rebuild the run),
- ``model.safetensors`` the weights,
- ``metrics.jsonl``  one JSON object per pass (train bound, learning rate, seconds, and
  every few passes the IWAE-64 bound on part of the test set),
- ``summary.json``   written last: a run with it is finished.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import safetensors.torch

from iwae import data as iwae_data
from iwae.data import atomic_write
from iwae.bounds import Objective
from iwae.errors import IwaeError, RunDirError
from iwae.model import VAE, ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

DATASETS = ("mnist", "omniglot")


@dataclass
class TrainConfig:
    """Everything that determines a training run; stored as ``config.json``."""

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
    data_dir: str | None = None
    model: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise IwaeError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.epochs is not None:
            self.stages = None
        if self.stages is not None and not 1 <= self.stages <= 8:
            raise IwaeError(f"--stages must be between 1 and 8, got {self.stages}")
        if self.epochs is not None and self.epochs < 1:
            raise IwaeError(f"--epochs must be >= 1, got {self.epochs}")
        if self.stages is None and self.epochs is None:
            raise IwaeError("give --stages or --epochs")
        for name in ("batch_size", "eval_every", "eval_n"):
            if getattr(self, name) < 1:
                raise IwaeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_train is not None and self.n_train < 1:
            raise IwaeError(f"--n-train must be >= 1, got {self.n_train}")
        if not (self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.adam_eps > 0):
            raise IwaeError("Adam needs lr > 0, 0 <= beta1, beta2 < 1 and eps > 0")
        self.objective_spec  # validates objective, k, m, beta, estimator
        if not self.model:
            self.model = ModelConfig.preset(self.layers, scale=self.scale).to_dict()
        self.model_config  # validates the architecture

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
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise IwaeError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**d)


# -- files, written atomically ----------------------------------------------------------


def write_json(path: Path, obj) -> None:
    atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


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


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[TrainConfig, VAE]:
    """The configuration and trained model of a run directory. Reads JSON and
    safetensors only: nothing in a run directory is executed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    config = TrainConfig.from_dict(_read_json(run_dir / CONFIG_FILE))
    model = VAE(config.model_config)
    path = run_dir / WEIGHTS_FILE
    if not path.exists():
        raise RunDirError(f"{path} is missing: the run has not saved weights yet")
    try:
        state = safetensors.torch.load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise RunDirError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise RunDirError(f"{path} does not match the model in {run_dir / CONFIG_FILE}: {' '.join(first[:3])}") from None
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
        raise RunDirError(f"{out} is not empty: choose another --out, or pass --overwrite to replace the run in it")
    return out


# -- the loop ---------------------------------------------------------------------------


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train(
    config: TrainConfig,
    out: str | Path,
    dataset: iwae_data.Dataset | None = None,
    progress: bool = True,
    overwrite: bool = False,
    device: str | None = None,
) -> dict:
    """Train a model as ``config`` says and write the run directory ``out``.

    ``dataset`` may be given directly (tests use small synthetic sets); otherwise it
    is loaded from ``config.data_dir``. Returns the summary that is also written to
    ``summary.json``.
    """
    out = prepare_run_dir(out, overwrite)
    if dataset is None:
        dataset = iwae_data.load_dataset(config.dataset, config.data_dir, validation=config.validation)
    dev = pick_device(device)

    train_x = torch.tensor(dataset.train, dtype=torch.float32)  # a copy: the loaded arrays are read-only
    if config.n_train is not None:
        train_x = train_x[: config.n_train]
    test_x = torch.from_numpy(iwae_data.binarize_fixed(dataset.test[: config.eval_n], seed=0))
    train_x, test_x = train_x.to(dev), test_x.to(dev)

    torch.manual_seed(config.seed)
    model = VAE(config.model_config, pixel_mean=train_x.mean(0)).to(dev)
    objective = config.objective_spec
    enc_params, dec_params = model.encoder_parameters(), model.decoder_parameters()
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps
    )

    out.mkdir(parents=True, exist_ok=True)
    for stale in (SUMMARY_FILE, METRICS_FILE):
        (out / stale).unlink(missing_ok=True)
    write_json(out / CONFIG_FILE, config.to_dict())

    from iwae.evaluate import iwae_bound  # evaluation imports this module for load_run

    n, bs = train_x.shape[0], config.batch_size
    total = config.total_passes
    bar = _progress(total, progress, f"{config.dataset} {objective}")
    started = time.perf_counter()
    done = 0
    test_bound = None
    with open(out / METRICS_FILE, "a") as metrics:
        for stage, passes, lr in config.schedule():
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(passes):
                t0 = time.perf_counter()
                model.train()
                xb_all = torch.bernoulli(train_x[torch.randperm(n, device=dev)])
                bound_sum = torch.zeros((), device=dev)
                for i in range(0, n, bs):
                    xb = xb_all[i : i + bs]
                    optimizer.zero_grad(set_to_none=True)
                    log_w = objective.log_weights(model, xb)
                    value = objective.backward(log_w, enc_params, dec_params)
                    optimizer.step()
                    bound_sum += value * xb.shape[0]
                done += 1
                record = {
                    "pass": done,
                    "stage": stage,
                    "lr": lr,
                    "train_bound": bound_sum.item() / n,
                    "seconds": time.perf_counter() - t0,
                }
                if done % config.eval_every == 0 or done == total:
                    model.eval()
                    test_bound = iwae_bound(model, test_x, k=64, seed=done)
                    record["test_iwae64"] = test_bound
                if not math.isfinite(record["train_bound"]):
                    raise IwaeError(f"training diverged at pass {done}: the bound is {record['train_bound']}")
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.update(1)
                bar.set_postfix(bound=f"{record['train_bound']:.2f}", stage=stage)
            save_weights(model, out / WEIGHTS_FILE)
    bar.close()
    summary = {
        "passes": done,
        "train_seconds": time.perf_counter() - started,
        "final_train_bound": record["train_bound"],
        "final_test_iwae64": test_bound,
        "test_iwae64_n": int(test_x.shape[0]),
        "n_train": n,
        "device": str(dev),
        "torch": torch.__version__,
    }
    write_json(out / SUMMARY_FILE, summary)
    return summary


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="pass", dynamic_ncols=True)
