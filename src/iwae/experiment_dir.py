"""An experiment directory's records: ``experiment.json`` (the experiment, its budget, what
shrinks or filters it (``overrides``, ``eval_k``, ``n_test``, ``--only``, ``--reuse``) and
its runs, over every invocation of :func:`iwae.experiments.reproduce` on it) and
``runner.json`` (each run's status, :func:`write_statuses`); and the ``--only`` selection
of a grid's runs by their labels."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from iwae.errors import IwaeError
from iwae.grids import Run
from iwae.rundir import read_json, write_json

EXPERIMENT_FILE = "experiment.json"


def only_values(value: str | list[str]) -> list[str]:
    """The values one ``only`` key accepts: a single value, or a list of them."""
    return value if isinstance(value, list) else [value]


def select_runs(runs: list[Run], name: str, only: dict | None) -> list[Run]:
    """The runs of experiment ``name`` whose labels match ``only``, with the runs they
    continue. ``only`` maps a label key to a value, or to a list of values of which the
    run's must be one."""
    if not only:
        return runs

    def matches(label: dict) -> bool:
        return all(str(label.get(k)) in [str(x) for x in only_values(v)] for k, v in only.items())

    keep = {r.name for r in runs if matches(r.label)}
    keep |= {r.after for r in runs if r.name in keep and r.after}
    if not keep:
        raise IwaeError(f"no run of {name} matches {only}")
    return [r for r in runs if r.name in keep]


def experiment_record(
    name: str,
    stages: int,
    seeds: int,
    runs: list[Run],
    evaluation: tuple[int, int | None],
    overrides: dict | None,
    only: dict | None,
    reuse: list | None,
) -> dict:
    """``experiment.json`` of one invocation: experiment ``name`` at ``stages`` stages and
    ``seeds`` seeds, evaluated as ``evaluation`` = ``(eval_k, n_test)``, shrunk by
    ``overrides``, filtered by ``only``, with runs copied from ``reuse``; and its ``runs``."""
    eval_k, n_test = evaluation
    return {
        "experiment": name,
        "stages": stages,
        "seeds": seeds,
        "passes_per_run": sum(3**i for i in range(stages)),
        "eval_k": eval_k,
        "n_test": n_test,
        "overrides": overrides or {},
        "only": only or {},
        "reuse": [str(d) for d in reuse or []],
        "runs": [asdict(r) for r in runs],
    }


def write_record(out: Path, meta: dict, only: dict | None) -> None:
    """Make the experiment directory ``out`` with ``runs/`` and write its ``experiment.json``:
    ``meta`` merged with what the file lists already (:func:`merged_with_previous`)."""
    meta = merged_with_previous(out, meta, only)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_json(out / EXPERIMENT_FILE, meta)


def merged_with_previous(out: Path, meta: dict, only: dict | None) -> dict:
    """``experiment.json``'s new content: a directory holds one experiment at one budget; the
    runs, ``--only`` filters and ``--reuse`` sources of earlier invocations stay listed."""
    previous = read_json(out / EXPERIMENT_FILE, required=False)
    if previous is None:
        return meta
    if (previous.get("experiment"), previous.get("stages"), previous.get("seeds")) != (
        meta["experiment"],
        meta["stages"],
        meta["seeds"],
    ):
        raise IwaeError(
            f"{out} holds experiment {previous.get('experiment')} at "
            f"stages={previous.get('stages')}, seeds={previous.get('seeds')}: use another --out "
            "for a different budget"
        )
    names = {r["name"] for r in meta["runs"]}
    meta["runs"] = [r for r in previous.get("runs", []) if r["name"] not in names] + meta["runs"]
    selections = [f for f in (*_as_list(previous.get("only")), *_as_list(only)) if f]
    meta["only"] = [f for i, f in enumerate(selections) if f not in selections[:i]]  # once each
    meta["reuse"] = list(dict.fromkeys([*previous.get("reuse", []), *meta["reuse"]]))
    return meta


def _as_list(only) -> list:
    return only if isinstance(only, list) else [only] if only else []


#: the experiment directory's record of its runs' statuses (:func:`write_statuses`)
RUNNER_FILE = "runner.json"


def write_statuses(out: Path, results: list[dict]) -> None:
    """Record each run's status in ``out/runner.json`` under ``runs``: "done", "skipped"
    (finished before), "stopped" (the time limit), "interrupted" (a signal) or "failed
    [after N retries]: REASON", with ``attempts`` where a run's task was called more than
    once (a worker died); runs of earlier calls keep theirs."""
    record = read_json(out / RUNNER_FILE, required=False)
    runs = record.get("runs", {}) if isinstance(record, dict) else {}
    for r in results:
        runs[r["name"]] = {k: r[k] for k in ("status", "attempts") if k in r}
    write_json(out / RUNNER_FILE, {"runs": runs})
