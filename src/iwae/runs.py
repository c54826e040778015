"""An open training run: where it trains, its data, model, optimizer and generator, made
afresh or restored from its checkpoint (:func:`open_run`); and a finished run read back
(:func:`load_run`, :func:`run_dataset`).
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from iwae import data as iwae_data
from iwae.bounds import Objective
from iwae.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_PREV_FILE,
    Progress,
    checkpoint_exists,
    load_checkpoint,
    read_checkpoint_file,
)
from iwae.config import TrainConfig, load_config
from iwae.conv import ConvConfig, ConvVAE
from iwae.distributed import barrier, distributed_setup
from iwae.errors import IwaeError, RunDirError
from iwae.latent import LatentVariableModel
from iwae.likelihoods import get_likelihood
from iwae.model import VAE
from iwae.optim import adam
from iwae.precision import decide as decide_precision
from iwae.rundir import (
    CONFIG_FILE,
    EVALUATION_FILE,
    EVALUATION_IMAGES_FILE,
    METRICS_FILE,
    STAGES_DIR,
    SUMMARY_FILE,
    TENSORBOARD_DIR,
    WEIGHTS_FILE,
    load_state,
    prepare_run_dir,
    read_metrics,
    read_safetensors,
    stage_dir,
    training_finished,
    weights_passes,
    write_json,
    write_metrics,
)
from iwae.runlog import NoBoard, tensorboard

#: ``--cuda-graphs`` choices: auto (on for a single-process CUDA run), off
CUDA_GRAPHS = ("auto", "off")

#: (example, sample) rows per training step below which one CPU thread is faster than
#: several: torch's intra-op threading of small kernels costs more than it saves. Measured
#: (bench/RESULTS.md, 2 cores, 1 layer, batch 20): 100 rows (k=5) 1.40x and 20 rows (k=1)
#: 1.71x faster on 1 thread than on 2; 500 rows (batch 100, k=5) 1.14x and 1,000 rows
#: (k=50) 1.78x faster on 2.
SMALL_STEP_ROWS = 256


def pick_device(device: str | None = None) -> torch.device:
    """The torch device named ``device``; None or "auto": CUDA where torch sees it, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise IwaeError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IwaeError(f"device {device!r} requested, but torch sees no CUDA device")
    return dev


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


def use_cuda_graphs(cuda_graphs: str, dev: torch.device, shard) -> bool:
    """Whether a run on ``dev`` replays its steps from CUDA graphs (``--cuda-graphs``)."""
    if cuda_graphs not in CUDA_GRAPHS:
        raise IwaeError(
            f"unknown --cuda-graphs {cuda_graphs!r}: choose one of {', '.join(CUDA_GRAPHS)}"
        )
    return cuda_graphs == "auto" and dev.type == "cuda" and shard is None


def build_model(config: TrainConfig, pixel_mean: torch.Tensor | None = None) -> VAE | ConvVAE:
    """The untrained model of ``config`` (output biases from ``pixel_mean``, the training
    images' mean, where given), on the CPU: Burda et al.'s MLP (:class:`iwae.model.VAE`)
    or, for ``arch`` conv, :class:`iwae.conv.ConvVAE`."""
    if isinstance(config.model_config, ConvConfig):
        return ConvVAE(config.model_config, pixel_mean=pixel_mean)
    return VAE(config.model_config, pixel_mean=pixel_mean)


def load_run(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    model: LatentVariableModel | None = None,
) -> tuple[TrainConfig, LatentVariableModel]:
    """The configuration and trained model of a run directory: the model its configuration
    names, or ``model`` (one of your own, of the run's architecture) with the run's weights.
    Reads JSON and safetensors only: nothing in a run directory is executed (a bound of
    your own that the run names in a file is loaded from that file, as it was trained)."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    model = build_model(config) if model is None else model
    path = _weights_file(run_dir)
    load_state(model, read_safetensors(path)[0], path)
    return config, model.to(device)


def _weights_file(run_dir: Path) -> Path:
    """The run's weights file, which its first stage end writes; a RunDirError before."""
    path = run_dir / WEIGHTS_FILE
    if not path.exists():
        raise RunDirError(f"{path} is missing: the run has not finished its first stage yet")
    return path


def evaluation_dir(run_dir: str | Path) -> tuple[Path, int | None]:
    """Where an evaluation of a run's weights (``iwae evaluate``) is written, and after how
    many passes of training, if it has not finished: a finished run's directory and None,
    else ``stages/P`` (:func:`iwae.rundir.stage_dir`) and P for the weights of its latest
    stage end. So a stage evaluation never takes the place of the run's own
    ``evaluation.json``, which marks a finished and evaluated run (``iwae reproduce`` skips
    it). P is recorded with the weights (:func:`iwae.rundir.weights_passes`); for weights
    saved before it was, it is the latest stage end that ``metrics.jsonl`` has passed."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)  # first: a directory without it is no run directory
    if training_finished(run_dir):
        return run_dir, None
    path = _weights_file(run_dir)
    passes = weights_passes(path)
    if passes is None:
        done = max((m.get("pass", 0) for m in read_metrics(run_dir)), default=0)
        ends = itertools.accumulate(p for _, p, _ in config.schedule())
        passes = max((end for end in ends if end <= done), default=None)
        if passes is None:
            raise RunDirError(f"{run_dir}/{METRICS_FILE} has no stage end: cannot date {path}")
    return stage_dir(run_dir, passes), passes


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
    data = iwae_data.load_dataset(source, data_dir or config.data_dir, eight_bit=config.eight_bit)
    if check_hash:
        if config.dataset_sha256 is not None and data.sha256 != config.dataset_sha256:
            raise IwaeError(
                f"{source}: not the data the run was trained on: its content sha256 is "
                f"{data.sha256}, config.json records {config.dataset_sha256} (from "
                f"{config.dataset_path}); pass --ignore-dataset-hash to use it anyway"
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


@dataclass
class Run:
    """An open training run: what its passes read and change. ``plan`` is the (stage,
    learning rate) of every pass, ``stage_ends`` the passes that end a stage."""

    config: TrainConfig
    out: Path
    lead: bool  # writes the files (rank 0 under torchrun)
    shard: tuple[int, int] | None
    model: VAE
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    train_x: torch.Tensor
    test_x: torch.Tensor
    state: Progress
    pass_start_rng: torch.Tensor | None
    board: object
    binarize: bool = True  # draw binary training images afresh (False: the images are 0/1 already)
    graphs: bool = False  # steps replayed from CUDA graphs (:mod:`iwae.cudagraph`)
    own_objective: Objective | None = None  # one handed to iwae.fit, in place of the config's
    # how auto decided the precision, when it did in this process (iwae.precision.decide)
    precision_measured: dict | None = None
    plan: list[tuple[int, float]] = field(init=False)
    stage_ends: set[int] = field(init=False)

    def __post_init__(self):
        self.plan = [(s, lr) for s, passes, lr in self.config.schedule() for _ in range(passes)]
        n = len(self.plan)
        self.stage_ends = {
            i for i in range(n) if i + 1 == n or self.plan[i + 1][0] != self.plan[i][0]
        }

    @property
    def objective(self) -> Objective:
        return self.own_objective or self.config.objective_spec


def open_run(
    config: TrainConfig,
    out: Path,
    dataset,
    overwrite: bool,
    device,
    resume: bool,
    cuda_graphs: str = "auto",
    model: LatentVariableModel | None = None,
    objective: Objective | None = None,
) -> Run:
    """Check the run directory, load the data, build the model and optimizer, and start the
    run's files, or restore all of it from the checkpoint. A run resumed before its first
    checkpoint (a ``config.json`` and no checkpoint) starts again from the beginning: with
    the same configuration it is the same run, and its partial files are replaced."""
    shard, dev = distributed_setup(pick_device(device))
    graphs = use_cuda_graphs(cuda_graphs, dev, shard)
    lead = shard is None or shard[0] == 0
    resume, overwrite = _resumable(out, resume, overwrite)
    if not resume and lead:
        prepare_run_dir(out, overwrite)
    # a bad checkpoint fails before the data loads
    checkpoint = read_checkpoint_file(out / CHECKPOINT_FILE) if resume else None
    dataset = _run_data(config, out, dataset, resume)
    config = config.for_data(dataset)
    train_x, test_x = _images(config, dataset, dev)
    model, optimizer, generator = _fresh_state(config, train_x, dev, graphs, model)
    measured = None
    if resume:  # a resumed run trains in the precision its config.json records
        recorded = load_config(out)
        config = config.replace(
            precision=recorded.precision, precision_requested=recorded.precision_requested
        )
    else:
        config, measured = decide_precision(config, model, objective, dev, shard)
    state, pass_start_rng = Progress(), None
    if resume:
        state, pass_start_rng = load_checkpoint(
            out / CHECKPOINT_FILE, model, optimizer, generator, checkpoint
        )
        if lead:  # drop lines of passes after the checkpoint
            write_metrics(out, read_metrics(out)[: state.passes])
    elif lead:
        _start_run_dir(out, config)
    barrier(shard)
    board = tensorboard(out, purge_step=state.passes if resume else None) if lead else NoBoard()
    return Run(
        config,
        out,
        lead,
        shard,
        model,
        optimizer,
        generator,
        train_x,
        test_x,
        state,
        pass_start_rng,
        board,
        binarize=config.binarizes and not dataset.binary,
        graphs=graphs,
        own_objective=objective,
        precision_measured=measured,
    )


def _resumable(out: Path, resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """(resume, overwrite) for the run directory ``out``: a run killed before its first
    checkpoint is the same run started again."""
    if resume and not checkpoint_exists(out):
        if not (out / CONFIG_FILE).exists():
            raise RunDirError(
                f"{out / CHECKPOINT_FILE} is missing: nothing to resume (start the run again "
                "without --resume)"
            )
        return False, True
    return resume, overwrite


def _run_data(config: TrainConfig, out: Path, dataset, resume: bool) -> iwae_data.Dataset:
    """``dataset`` if given, else the configuration's (a resumed run's from its recorded
    absolute path, whatever the working directory); a resumed run's must be its own."""
    if dataset is None:
        dataset = iwae_data.load_dataset(
            config.dataset_path or config.dataset,
            config.data_dir,
            validation=config.validation,
            eight_bit=config.eight_bit,
        )
    if resume and config.dataset_sha256 != dataset.sha256:
        raise RunDirError(
            f"{dataset.name} is not the data {out} was trained on (content sha256 "
            f"{dataset.sha256}, {out / CONFIG_FILE} records {config.dataset_sha256}): the run "
            "cannot be resumed on it"
        )
    return dataset


def _images(
    config: TrainConfig, dataset: iwae_data.Dataset, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grey training images (checked) and the test subset of the logged bounds
    (:func:`iwae.data.test_images`: binarized for a Bernoulli likelihood); for any other
    likelihood both must lie in its support."""
    # a copy: the loaded arrays are read-only
    train_x = torch.tensor(dataset.train, dtype=torch.float32)
    if config.n_train is not None:
        train_x = train_x[: config.n_train]
    if not (torch.isfinite(train_x).all() and train_x.min() >= 0 and train_x.max() <= 1):
        raise IwaeError(
            f"training images of {dataset.name} must be grey values in [0, 1] (found NaN, inf "
            "or others)"
        )
    test_x = torch.from_numpy(iwae_data.test_images(dataset, config.eval_n, config.binarizes))
    if not config.binarizes and config.likelihood in LIKELIHOODS_CHECKED:
        likelihood = get_likelihood(config.likelihood)
        likelihood.check_data(train_x, f"training images of {dataset.name}")
        likelihood.check_data(test_x, f"test images of {dataset.name}")
    return train_x.to(dev), test_x.to(dev)


#: the likelihoods whose support :func:`_images` checks the data against (a model handed to
#: iwae.fit may name a likelihood of its own)
LIKELIHOODS_CHECKED = ("continuous-bernoulli", "gaussian", "logistic-256")


def _fresh_state(
    config: TrainConfig,
    train_x: torch.Tensor,
    dev: torch.device,
    capturable: bool = False,
    model: LatentVariableModel | None = None,
):
    """Seeded model (``model`` where one is given; or another run's weights,
    ``init_weights``), Adam (``capturable`` for CUDA graphs: :func:`iwae.optim.adam`) and
    the run's generator."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if model is None:
        model = build_model(config, pixel_mean=train_x.mean(0))
    model = model.to(dev)
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
        CHECKPOINT_PREV_FILE,
        WEIGHTS_FILE,
        EVALUATION_FILE,
        EVALUATION_IMAGES_FILE,
    ):
        (out / stale).unlink(missing_ok=True)
    for stale_dir in (TENSORBOARD_DIR, STAGES_DIR):
        shutil.rmtree(out / stale_dir, ignore_errors=True)
    write_json(out / CONFIG_FILE, config.to_dict())
