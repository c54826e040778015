"""Run results as the report reads them: an experiment directory's runs (:class:`RunResult`,
:func:`load_experiment`) with their evaluations, per-image values, learning curves and
wall times, and the papers' published numbers (:func:`paper_tables`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path

import numpy as np

from iwae.data import TEST_SIZES
from iwae.rundir import read_evaluation_images, read_metrics, read_stage_evaluations, stage_dir


def paper_tables() -> dict:
    """The published numbers (Burda et al. 2016 Tables; Rainforth et al. 2018), shipped with
    the package."""
    return json.loads(files("iwae").joinpath("paper_tables.json").read_text())


def independent_reproductions() -> dict:
    """A second reference beside the paper: an independent reproduction of Burda et al.
    Table 1 at the full schedule (nbip/IWAE, TensorFlow 2; its ``source`` names the commit),
    shipped with the package."""
    return json.loads(files("iwae").joinpath("independent_reproductions.json").read_text())


def independent_table1() -> dict:
    """The independent reproduction's Table 1 test NLL by (dataset, stochastic layers, k,
    objective), for the objectives of Table 1 (VAE and IWAE)."""
    data = independent_reproductions()
    return {
        (dataset, int(layers), int(k), objective): nll
        for dataset in ("mnist", "omniglot")
        for layers, by_objective in data.get(dataset, {}).items()
        for objective, by_k in by_objective.items()
        if objective in ("vae", "iwae")
        for k, nll in by_k.items()
    }


def table_rows(table: dict) -> list[dict]:
    """The rows of one table of :func:`paper_tables` as dicts keyed by its columns."""
    return [dict(zip(table["columns"], row)) for row in table["rows"]]


def paper_table1() -> dict:
    """Burda et al. Table 1 by (dataset, stochastic layers, k, objective)."""
    return {
        (r["dataset"], r["stochastic_layers"], r["k"], r["objective"]): r
        for r in table_rows(paper_tables()["burda2016_table1"])
    }


@dataclass
class RunResult:
    """One run of an experiment directory as the report reads it: its label and
    configuration from ``experiment.json``, and its run directory's files (None where missing);
    per-image values are read on demand (:func:`per_image_values`)."""

    name: str
    label: dict
    config: dict
    evaluation: dict | None
    activity: list | None
    runner: dict | None
    metrics: list[dict]
    summary: dict | None
    offset: int = 0  # passes of the run it continues (two-stage), for learning curves
    after: RunResult | None = None  # the run it continues
    run_dir: Path | None = None
    passes: int | None = None  # the experiment's passes per run: the budget of its evaluation
    # evaluations of the weights of stage ends made while the run trained, by passes
    stages: dict[int, dict] = field(default_factory=dict)
    _images: dict | None = field(default=None, repr=False)
    _images_read: bool = field(default=False, repr=False)


def load_experiment(exp_dir: Path) -> tuple[dict, list[RunResult]]:
    """``(experiment.json, its runs)`` of the experiment directory ``exp_dir``, each run
    linked to the run it continues."""
    meta = read_json_or_none(exp_dir / "experiment.json")
    results = []
    for run in meta["runs"]:
        d = exp_dir / "runs" / run["name"]
        activity = read_json_or_none(d / "activity.json")
        results.append(
            RunResult(
                run["name"],
                run["label"],
                run["config"],
                read_json_or_none(d / "evaluation.json"),
                activity and activity["unit_activity"],
                read_json_or_none(d / "runner.json"),
                read_metrics(d),
                read_json_or_none(d / "summary.json"),
                run_dir=d,
                passes=meta.get("passes_per_run"),
                stages=read_stage_evaluations(d),
            )
        )
    by_name = {r.name: r for r in results}
    for r, run in zip(results, meta["runs"]):
        r.after = by_name.get(run.get("after"))
        r.offset = len(r.after.metrics) if r.after else 0
    return meta, results


def stage_results(r: RunResult) -> list[RunResult]:
    """``r``'s stage evaluations (``iwae evaluate`` of the run while it trained:
    :func:`iwae.runs.evaluation_dir`), each a :class:`RunResult` of its own: the evaluation
    after ``passes`` passes, with its per-image values in its stage directory."""
    if r.run_dir is None:
        return []
    return [
        replace(
            r,
            evaluation=e,
            passes=p,
            run_dir=stage_dir(r.run_dir, p),
            stages={},
            _images=None,
            _images_read=False,
        )
        for p, e in sorted(r.stages.items())
    ]


def read_json_or_none(path: Path):
    """The JSON in ``path``, or None where it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


WHOLE, RANDOM, FIRST = "whole", "random", "first"


def evaluated_images(evaluation: dict, dataset: str | None) -> tuple[str, int | None, int | None]:
    """``(kind, n, N)``: an evaluation on the whole test set of N images, on a seeded
    random subset of n of them, or (made before subsets were random: no
    ``test_subset_seed`` key) on the first n, which is never put beside the papers' numbers."""
    size = evaluation.get("test_set_size") or TEST_SIZES.get(dataset)
    n = evaluation.get("n_test")
    if n is None or size is None or n >= size:
        return WHOLE, n, size
    return (RANDOM if evaluation.get("test_subset_seed") is not None else FIRST), n, size


def images_kind(r: RunResult) -> tuple[str, int | None, int | None]:
    """:func:`evaluated_images` of a run's evaluation."""
    return evaluated_images(r.evaluation, r.config.get("dataset"))


def per_image_values(r: RunResult) -> dict[str, np.ndarray] | None:
    """The per-image values of ``r``'s evaluation as float64 arrays (read once), or None
    where there are none or they do not belong to its evaluation.json."""
    if not r._images_read:
        r._images_read = True
        tensors = read_evaluation_images(r.run_dir) if r.run_dir is not None else None
        if tensors is not None and r.evaluation is not None:
            t = {
                k: v.numpy().astype(np.int64 if k == "test_index" else np.float64)
                for k, v in tensors.items()
            }
            if len(t["test_index"]) == r.evaluation.get("n_test", len(t["test_index"])):
                r._images = t
    return r._images


def group_runs(results, keys):
    """The evaluated runs by the values of their label ``keys``: the cells of a table."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        if r.evaluation is not None:
            groups.setdefault(tuple(r.label[k] for k in keys), []).append(r)
    return groups


def share_k1(cells: dict[tuple, list]) -> dict[tuple, list]:
    """Table 1's cells keyed (..., k, objective), with the k=1 VAE and IWAE cells each
    holding the runs of both: at k=1 they are one objective (the one-sample ELBO), so a
    grid that trained one of them fills both rows. Where both were trained their numbers
    are the same, and so are the cells' means."""
    out = dict(cells)
    for key in cells:
        *rest, k, objective = key
        if k == 1 and objective in ("vae", "iwae"):
            vae, iwae = (*rest, 1, "vae"), (*rest, 1, "iwae")
            out[vae] = out[iwae] = cells.get(vae, []) + cells.get(iwae, [])
    return out


def mean_of(values):
    """The mean of the values that are not None, or None."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def std_of(values):
    """The standard deviation (ddof 1) of the values that are not None, or None under two."""
    values = [v for v in values if v is not None]
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _lockstep_size(runner: dict) -> int:
    """How many runs trained in the run's lockstep group, by the ``lockstep`` key (1: alone)."""
    return len(runner.get("lockstep") or ()) or 1


def training_by_device(r: RunResult) -> dict[str, float] | None:
    """Seconds of each machine that a run's training took, as its share where it trained in
    a lockstep group of n runs (one process: 1/n of the group's time each): ``runner.json``'s
    ``train_share_s_by_device``; else ``train_wall_s_by_device``, divided by n where a
    ``lockstep`` key names the group (files written before shares were recorded); None when
    neither was recorded."""
    runner = r.runner or {}
    if runner.get("train_share_s_by_device"):
        return dict(runner["train_share_s_by_device"])
    by_device = runner.get("train_wall_s_by_device")
    return {key: s / _lockstep_size(runner) for key, s in by_device.items()} if by_device else None


def process_seconds(r: RunResult) -> float:
    """A run's share of process time, training (:func:`training_by_device`) and evaluation.
    Training is never less than the run's own clock (``summary.json``'s ``train_seconds``,
    else the sum of ``metrics.jsonl``'s per-pass ``seconds``), shared the same way: a run
    continued by commands that did not record their wall time in ``runner.json`` still
    counts all of its training."""
    by_device = training_by_device(r)
    train = (
        sum(by_device.values())
        if by_device
        else r.runner["train_wall_s"] / _lockstep_size(r.runner)
    )
    own = (r.summary or {}).get("train_seconds")
    if not isinstance(own, (int, float)):
        own = sum(m.get("seconds", 0.0) for m in r.metrics)
    return max(train, own / _lockstep_size(r.runner)) + r.runner.get("eval_wall_s", 0.0)


def gpu_training(r: RunResult) -> tuple[dict[str, float], bool]:
    """Seconds of a run's training on each GPU (its share: :func:`training_by_device`), and
    whether it trained on a CPU too; for runs trained before ``runner.json`` recorded the
    machine (keys such as ``cuda (NVIDIA H100 80GB HBM3)``), from ``summary.json``."""
    by_device = training_by_device(r)
    if by_device:
        gpus = {
            key.partition(" (")[2].rstrip(")") or key: s
            for key, s in by_device.items()
            if key.startswith("cuda")
        }
        return gpus, any(not key.startswith("cuda") and s > 0 for key, s in by_device.items())
    if r.summary and str(r.summary.get("device", "cpu")).startswith("cuda"):
        return {r.summary.get("gpu") or r.summary["device"]: r.summary["train_seconds"]}, False
    return {}, False
