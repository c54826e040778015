"""Reusing finished runs: ``iwae reproduce --reuse DIR`` copies into an experiment the
finished runs of other experiment directories whose training computes exactly what a run
of this experiment would (:func:`training_key`), instead of training them again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from iwae.config import TrainConfig
from iwae.errors import IwaeError
from iwae.grids import Run
from iwae.rundir import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_json,
    training_finished,
    write_json,
)

#: configuration keys that do not change what a run computes
_NOT_COMPARED = ("data_dir", "checkpoint_minutes", "stage_nll_k", "precision_requested")


def reuse_runs(
    runs: list[Run], out: Path, sources: list[Path], data_dir: str | None, progress: bool = True
) -> list[str]:
    """Copy into ``out/runs`` every finished run of the experiment directories ``sources``
    whose training configuration equals that of a run here that has no directory yet
    (runs that start from another run's weights are not reused). A copied run keeps its
    training (weights, metrics, summary); it is evaluated here as this experiment asks,
    unless its evaluation already matches. Returns the names of the runs copied."""
    for source in sources:
        if not (source / "runs").is_dir():
            raise IwaeError(f"--reuse {source}: not an experiment directory (no runs/ in it)")
    finished = _finished_runs(sources)
    copied = []
    for run in runs:
        target = out / "runs" / run.name
        if run.after is not None or target.exists():
            continue
        # lists, as in config.json
        config = json.loads(json.dumps(TrainConfig(**run.config, data_dir=data_dir).to_dict()))
        exact, same = training_key(config, exact=True), training_key(config)
        match = next((d for key, _, d in finished if key == exact), None)  # the same run if any
        match = match or next((d for _, key, d in finished if key == same), None)
        if match is None:
            continue
        _copy_run(match, target)
        copied.append(run.name)
        if progress:
            print(f"{run.name}: reused from {match}", flush=True)
    return copied


def _finished_runs(sources: list[Path]) -> list[tuple[dict, dict, Path]]:
    """``(exact training key, training key, run directory)`` of every trained run (summary
    and weights written, a valid ``config.json``) in the experiment directories ``sources``."""
    finished = []
    for source in sources:
        for run_dir in sorted((source / "runs").iterdir()):
            config = read_json(run_dir / CONFIG_FILE, required=False)
            if not (
                isinstance(config, dict)
                and training_finished(run_dir)
                and (run_dir / WEIGHTS_FILE).exists()
            ):
                continue
            config = _as_written(config)
            if config is not None:
                finished.append((training_key(config, exact=True), training_key(config), run_dir))
    return finished


def _copy_run(source: Path, target: Path) -> None:
    """Copy the run directory ``source`` to ``target`` without its checkpoints, TensorBoard
    logs and lock, noting ``reused_from`` in its ``runner.json``; the copy appears all at
    once (renamed into place), so a half-copied run is never taken for a run."""
    partial = target.with_name(target.name + ".copying")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(
        source,
        partial,
        ignore=shutil.ignore_patterns(
            "checkpoint.safetensors",
            "checkpoint.next.safetensors",
            "checkpoint.prev.safetensors",
            ".checkpoint.*",
            ".lock",
            ".lock.json",
            "tb",
        ),
    )
    timing = read_json(partial / "runner.json", required=False) or {}
    timing["reused_from"] = str(source)
    write_json(partial / "runner.json", timing)
    partial.rename(target)


def _as_written(config: dict) -> dict | None:
    """The keys of ``config`` as this version writes them into ``config.json`` (lists, and
    the keys an older version did not write at the values they stand for), or None if it is
    not a valid configuration."""
    try:
        return json.loads(json.dumps(TrainConfig.from_dict(config).to_dict()))
    except (IwaeError, TypeError, ValueError):  # a hand-edited config.json can hold anything
        return None


def is_one_sample_elbo(config: dict) -> bool:
    """Whether the ``config.json`` keys ``config`` train on the ELBO of one sample, L_1, under
    either name: a VAE or an IWAE at k = 1 with one sample group (m = 1) and the reparameter
    or STL gradient. Both are then the same value and gradient bit for bit (the logsumexp of
    one log-weight is that log-weight), so Table 1's VAE k=1 and IWAE k=1 are one training
    run. (DReG and the multi-sample objectives differ even at k = 1.)"""
    return (
        config.get("objective") in ("vae", "iwae")
        and config.get("k") == 1
        and config.get("m", 1) == 1
        and config.get("estimator", "reparam") in ("reparam", "stl")
    )


def training_key(config: dict, exact: bool = False) -> dict:
    """What a run's training computes, from its ``config.json`` keys: without the keys that
    change nothing (:data:`_NOT_COMPARED`), and with the one-sample ELBO written alike under
    both its names (:func:`is_one_sample_elbo`) unless ``exact`` (written as they are)."""
    key = {k: v for k, v in config.items() if k not in _NOT_COMPARED}
    if not exact and is_one_sample_elbo(key):
        key["objective"] = "vae=iwae(k=1)"
    return key
