"""The Python API: your model and bound, the papers' schedule, checkpoints and evaluation.

    import iwae
    summary = iwae.fit(model, "iwae", "mnist", k=5, schedule=3, out="runs/mine")
    result = iwae.evaluate_model(model, "mnist")       # test NLL (L_5000) and the rest
    ais = iwae.run_ais(model, "mnist", n_test=100)      # log p(x) by AIS beside L_k

:func:`fit` is the engine ``iwae train`` runs (:func:`iwae.engine.train`): the same run
directory, checkpoints, bit-exact resume, time limit, progress and TensorBoard logs. A
model is any :class:`iwae.latent.LatentVariableModel` (Burda et al.'s
:class:`iwae.model.VAE` when none is given, or :class:`iwae.latent.ModuleVAE` around your
own encoder and decoder); an objective a built-in name, code named ``file.py:function``,
an :class:`iwae.bounds.Objective`, an :class:`iwae.bounds.Bound` or a plain function of
the [S, B] log-weights; data a built-in name, the path of your own files, an
:class:`iwae.data.Dataset`, or arrays/tensors ``(train, test)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from iwae import data as iwae_data
from iwae.bounds import OBJECTIVES, Bound, Objective
from iwae.config import GIVEN_IN_PYTHON, TrainConfig, load_config
from iwae.engine import train
from iwae.errors import IwaeError
from iwae.evaluate import evaluate_ais, evaluate_images
from iwae.latent import LatentVariableModel
from iwae.rundir import CONFIG_FILE, SUMMARY_FILE, read_json, training_finished
from iwae.runs import load_run, run_dataset
from iwae.user_code import is_code_spec

#: configuration keys that do not change what a run computes (a run continued with other
#: values of these is the same run)
_NOT_COMPARED = ("data_dir", "checkpoint_minutes", "objective_sha256", "objective_code")


def fit(
    model: LatentVariableModel | None = None,
    objective: str | Objective | Bound | Callable = "iwae",
    data="mnist",
    *,
    out: str | Path,
    k: int = 1,
    schedule: int | str = "paper",
    epochs: int | None = None,
    objective_params: dict | None = None,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    time_limit: float | None = None,
    data_dir: str | None = None,
    cuda_graphs: str = "auto",
    **options,
) -> dict:
    """Train ``model`` with ``objective`` on ``data`` in the run directory ``out``.

    ``k``: samples per example (of each group for MIWAE/PIWAE, with ``m=`` among
    ``options``); ``schedule``: the first ``schedule`` stages of Burda et al.'s (1-8;
    "paper" = 8, 3,280 passes), or ``epochs`` passes at the constant rate ``lr``.
    ``options``: any other key of :class:`iwae.config.TrainConfig` (``batch_size``, ``lr``,
    ``seed``, ``estimator``, ``m``, ``beta``, ``layers``/``latent``/``hidden``, ``likelihood``
    (``gaussian_scale``), ``arch`` and ``channels`` for the built-in models, ``eval_every``,
    ``stage_nll_k``, ``precision`` = "auto" (default), "fp32" or "bf16"
    (:mod:`iwae.precision`), ...). ``objective_params``: keyword
    arguments of a bound named in code.

    Calling it again with the same arguments continues the run from its checkpoint (a
    killed run ends with the same weights, bit for bit, as one never interrupted) or, if
    it has finished, returns its summary; other arguments on an existing run are refused
    (``overwrite=True`` starts afresh). ``time_limit`` (minutes): stop with a checkpoint
    and raise :class:`iwae.errors.TimeLimitReached`. Returns the run's summary (also in
    ``out/summary.json``); the trained weights are in ``model`` and ``out``.
    """
    out = Path(out)
    likelihood = options.get("likelihood", "bernoulli") if model is None else None
    likelihood = likelihood or model.likelihood.name
    dataset = as_dataset(data, data_dir, eight_bit=likelihood == "logistic-256")
    own_objective, keys = _objective_keys(objective, k, options.pop("estimator", None))
    keys.update(_model_keys(model), **_schedule_keys(schedule, epochs), **options)
    keys.update(dataset=dataset.path or dataset.name, data_dir=data_dir)
    if objective_params is not None:
        keys["objective_params"] = objective_params
    config = TrainConfig(**keys).for_data(dataset)
    resume = not overwrite and (out / CONFIG_FILE).exists()
    if resume:
        _check_same_run(out, config)
        if training_finished(out):
            return read_json(out / SUMMARY_FILE)
    stop_at = None if time_limit is None else time.time() + 60 * time_limit
    return train(
        config,
        out,
        dataset=dataset,
        progress=progress,
        overwrite=overwrite,
        device=device,
        resume=resume,
        cuda_graphs=cuda_graphs,
        stop_at=stop_at,
        model=model,
        objective=own_objective,
    )


def as_dataset(data, data_dir: str | None = None, eight_bit: bool = False) -> iwae_data.Dataset:
    """``data`` as a :class:`iwae.data.Dataset`: a built-in name or a path (loaded), a
    Dataset (as it is), ``(train, test)`` or ``{"train": ..., "test": ...}`` of arrays or
    tensors (:func:`iwae.data.from_arrays`). ``eight_bit``: integer arrays hold the levels
    0..255 of 8-bit images, read as v / 255 (:func:`iwae.data.load_files`)."""
    if isinstance(data, iwae_data.Dataset):
        return data
    if isinstance(data, (str, Path)):
        return iwae_data.load_dataset(str(data), data_dir, eight_bit=eight_bit)
    if isinstance(data, dict):
        return iwae_data.from_arrays(**data, eight_bit=eight_bit)
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        return iwae_data.from_arrays(*data, eight_bit=eight_bit)
    raise IwaeError(
        "data must be a dataset name, a path, an iwae.data.Dataset, or (train, test) arrays "
        f"or tensors, got {type(data).__name__}"
    )


def _objective_keys(objective, k: int, estimator: str | None) -> tuple[Objective | None, dict]:
    """(the objective to hand to the engine, or None where the configuration names it; the
    configuration keys that record it)."""
    estimator = estimator or (objective.estimator if isinstance(objective, Objective) else None)
    estimator = estimator or "reparam"
    if isinstance(objective, str):
        if objective not in OBJECTIVES and not is_code_spec(objective):
            raise IwaeError(
                f"unknown objective {objective!r}: one of {', '.join(OBJECTIVES)}, or a bound "
                "in code (path/file.py:function or package.module:function)"
            )
        return None, {"objective": objective, "k": k, "estimator": estimator}
    if isinstance(objective, Objective) and objective.custom is None:
        return None, {key: getattr(objective, key) for key in ("k", "m", "beta")} | {
            "objective": objective.name,
            "estimator": estimator,
        }
    if isinstance(objective, Objective):
        objective = objective.custom
    if not isinstance(objective, Bound):
        if not callable(objective):
            raise IwaeError(
                f"objective must be a name, an Objective, a Bound or a function, got {objective!r}"
            )
        objective = Bound(objective, getattr(objective, "__name__", "bound"))
    spec = Objective(k=k, estimator=estimator, custom=objective)
    keys = {"objective": spec.name, "k": spec.k, "estimator": estimator}
    return spec, keys | {"objective_code": GIVEN_IN_PYTHON}


def _model_keys(model) -> dict:
    """The configuration keys that describe a model handed to :func:`fit` (none for the
    built-in model, which the configuration builds)."""
    if model is None:
        return {}
    if not isinstance(model, torch.nn.Module) or not isinstance(model, LatentVariableModel):
        raise IwaeError(
            "model must be a torch.nn.Module implementing iwae.latent.LatentVariableModel "
            f"(e.g. iwae.ModuleVAE(encoder, decoder, latent)), got {type(model).__name__}"
        )
    described = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "latent": list(model.latent_sizes),
        "parameters": sum(p.numel() for p in model.parameters()),
        "likelihood": model.likelihood.name,
    }
    return {
        "model": described,
        "model_code": GIVEN_IN_PYTHON,
        "likelihood": described["likelihood"],
    }


def _schedule_keys(schedule: int | str, epochs: int | None) -> dict:
    if epochs is not None:
        return {"epochs": epochs, "stages": None}
    if schedule == "paper":
        return {"stages": 8}
    if isinstance(schedule, int) and not isinstance(schedule, bool):
        return {"stages": schedule}
    raise IwaeError(f"schedule must be a number of stages (1-8) or 'paper', got {schedule!r}")


def _check_same_run(out: Path, config: TrainConfig) -> None:
    """Refuse to continue the run in ``out`` with other settings than it was started with."""
    old = load_config(out).to_dict()
    new = config.to_dict()
    # the run records the precision it decided on and the one asked for: compare what was asked
    old["precision"] = old.pop("precision_requested") or old["precision"]
    new.pop("precision_requested")
    differ = [key for key in new if key not in _NOT_COMPARED and old.get(key) != new[key]]
    if differ:
        shown = "; ".join(f"{key}: {old.get(key)!r} there, {new[key]!r} now" for key in differ)
        raise IwaeError(
            f"{out} holds a run with other settings ({shown}): give another out, or "
            "overwrite=True to start afresh"
        )


# -- evaluation -------------------------------------------------------------------------------


def load(run_dir: str | Path, model: LatentVariableModel | None = None, device="cpu"):
    """(configuration, trained model) of a run directory: the model it names, or ``model``
    (your own, of the run's architecture) given the run's weights."""
    return load_run(run_dir, device, model)


def _model_and_images(model, data, n_test, data_dir) -> tuple[LatentVariableModel, torch.Tensor]:
    """The model (a run directory is loaded) and its test images: those of ``data`` (a
    name, a path or a Dataset: its test set, binarized once for a Bernoulli decoder), or
    ``data`` itself as an array or tensor of test images."""
    if isinstance(model, (str, Path)):
        config, model = load_run(model)
        if data is None:
            data = run_dataset(config, data_dir=data_dir)
    if data is None:
        raise IwaeError("give the test data (a name, a path, a Dataset, or test images)")
    if isinstance(data, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(np.asarray(data.detach().cpu() if hasattr(data, "detach") else data))
        x = x.reshape(x.shape[0], -1).float()
        return model, x[:n_test] if n_test else x
    name = model.likelihood.name
    dataset = as_dataset(data, data_dir, eight_bit=name == "logistic-256")
    return model, torch.from_numpy(iwae_data.test_images(dataset, n_test, name == "bernoulli"))


def evaluate_model(
    model,
    data=None,
    k: int = 5000,
    n_test: int | None = None,
    seed: int = 0,
    progress: bool = False,
    data_dir: str | None = None,
    per_image: bool = False,
):
    """The test metrics of ``model`` (or of a run directory) on ``data``'s test set: the
    keys of ``iwae evaluate --json`` (``nll`` = -mean L_k with its standard error,
    ``iwae64``, ``log_px``, ``neg_kl_q_p``, ``elbo``, ``active_units``). ``n_test``: a
    seeded random subset of the test set. With ``per_image``, also the per-image values."""
    model, x = _model_and_images(model, data, n_test, data_dir)
    device = next(model.parameters()).device
    result, images = evaluate_images(model, x.to(device), k, seed=seed, progress=progress)
    return (result, images) if per_image else result


def run_ais(
    model,
    data=None,
    steps: int = 1000,
    chains: int = 16,
    leapfrog_steps: int = 10,
    n_test: int | None = 100,
    k: int = 5000,
    seed: int = 0,
    progress: bool = False,
    data_dir: str | None = None,
):
    """log p(x) by annealed importance sampling (``steps`` intermediate distributions,
    ``chains`` chains per image, HMC transitions) on a seeded random subset of ``n_test``
    test images, beside L_k on the same images: the keys of ``iwae evaluate --method ais``."""
    model, x = _model_and_images(model, data, n_test, data_dir)
    device = next(model.parameters()).device
    result, _ = evaluate_ais(
        model, x.to(device), steps, chains, leapfrog_steps, seed=seed, k=k, progress=progress
    )
    return result
