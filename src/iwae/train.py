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

This module is the public face of training; the parts live by concept:

- :mod:`iwae.config`       the configuration (:class:`TrainConfig`) and its files
- :mod:`iwae.optim`        Adam and the training step (:func:`train_step`)
- :mod:`iwae.runs`         an open run (device, data, model, optimizer), a finished one read back
- :mod:`iwae.engine`       the one training loop (:func:`train`, :func:`resume`)
- :mod:`iwae.steppers`     how the loop takes a step: eager, or replayed from CUDA graphs
- :mod:`iwae.lockstep`     runs trained side by side as one stacked model (:func:`train_lockstep`)
- :mod:`iwae.distributed`  torchrun: the process group and the sharded backward pass
- :mod:`iwae.runlog`       metrics lines, TensorBoard and progress bars

The names here are those modules' objects: to replace one that the loop calls (a test's
``monkeypatch.setattr``), set it in the module that calls it (``iwae.steppers.train_step``).
"""

from __future__ import annotations

from iwae.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_NEXT_FILE,
    Progress,
    checkpoint_meta,
    load_checkpoint,
    save_checkpoint,
)
from iwae.config import (
    BINARIZE,
    DATASETS,
    TrainConfig,
    load_config,
    read_config_file,
    resume_config,
)
from iwae.distributed import distributed_setup
from iwae.engine import GUARD_EVERY, resume, time_limit_passed, train
from iwae.lockstep import (
    LOCKSTEP_KEYS,
    LockstepStep,
    StackedNoise,
    lockstep_key,
    settle_group_checkpoint,
    train_lockstep,
)
from iwae.memory import reuse_freed_memory
from iwae.optim import adam, learning_rate, set_lr, train_step
from iwae.rundir import (
    CONFIG_FILE,
    EVALUATION_FILE,
    EVALUATION_IMAGES_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    TENSORBOARD_DIR,
    WEIGHTS_FILE,
    load_state,
    prepare_run_dir,
    read_evaluation_images,
    read_json,
    read_metrics,
    read_safetensors,
    save_weights,
    write_evaluation,
    write_json,
    write_metrics,
)
from iwae.runs import (
    CUDA_GRAPHS,
    SMALL_STEP_ROWS,
    auto_threads,
    build_model,
    evaluation_dir,
    flush_denormals,
    load_run,
    pick_device,
    run_dataset,
    use_cuda_graphs,
)

__all__ = [
    "BINARIZE",
    "CHECKPOINT_FILE",
    "CHECKPOINT_NEXT_FILE",
    "CONFIG_FILE",
    "CUDA_GRAPHS",
    "DATASETS",
    "EVALUATION_FILE",
    "EVALUATION_IMAGES_FILE",
    "GUARD_EVERY",
    "LOCKSTEP_KEYS",
    "METRICS_FILE",
    "SMALL_STEP_ROWS",
    "SUMMARY_FILE",
    "TENSORBOARD_DIR",
    "WEIGHTS_FILE",
    "LockstepStep",
    "Progress",
    "StackedNoise",
    "TrainConfig",
    "adam",
    "auto_threads",
    "build_model",
    "evaluation_dir",
    "checkpoint_meta",
    "distributed_setup",
    "flush_denormals",
    "learning_rate",
    "load_checkpoint",
    "load_config",
    "load_run",
    "load_state",
    "lockstep_key",
    "pick_device",
    "prepare_run_dir",
    "read_config_file",
    "reuse_freed_memory",
    "read_evaluation_images",
    "read_json",
    "read_metrics",
    "read_safetensors",
    "resume",
    "resume_config",
    "run_dataset",
    "save_checkpoint",
    "save_weights",
    "set_lr",
    "settle_group_checkpoint",
    "time_limit_passed",
    "train",
    "train_lockstep",
    "train_step",
    "use_cuda_graphs",
    "write_evaluation",
    "write_json",
    "write_metrics",
]
