"""Figures and the reproduction report: our numbers beside the papers', with plots."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import reduce
from itertools import pairwise
from pathlib import Path

import numpy as np

from iwae.data import TEST_SIZES, atomic_write, tile_images


def save_image_grid(
    images: np.ndarray, path: str | Path, side: int = 28, cols: int | None = None, shape=None
) -> None:
    """Save images (pixel values in [0, 1], ink = 1) as a PNG grid, black ink on white, atomically;
    tiles of the image shape ``shape`` (see :func:`iwae.data.tile_images`), else side x side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = tile_images(images, side, cols, shape=shape)
    atomic_write(
        Path(path),
        lambda f: plt.imsave(f, 1.0 - grid, cmap="gray", vmin=0.0, vmax=1.0, format="png"),
    )


# -- the reproduction report ------------------------------------------------------------------

REPORT_FILE = "REPORT.md"


def paper_tables() -> dict:
    """The published numbers (Burda et al. 2016 Tables; Rainforth et al. 2018), shipped with the package."""
    from importlib.resources import files

    return json.loads(files("iwae").joinpath("paper_tables.json").read_text())


def _rows(table: dict) -> list[dict]:
    return [dict(zip(table["columns"], row)) for row in table["rows"]]


@dataclass
class RunResult:
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
    _images: dict | None = field(default=None, repr=False)
    _images_read: bool = field(default=False, repr=False)


def load_experiment(exp_dir: Path) -> tuple[dict, list[RunResult]]:
    from iwae.train import read_metrics

    meta = _read_json(exp_dir / "experiment.json")
    results = []
    for run in meta["runs"]:
        d = exp_dir / "runs" / run["name"]
        activity = _read_json(d / "activity.json")
        results.append(
            RunResult(
                run["name"],
                run["label"],
                run["config"],
                _read_json(d / "evaluation.json"),
                activity and activity["unit_activity"],
                _read_json(d / "runner.json"),
                read_metrics(d),
                _read_json(d / "summary.json"),
                run_dir=d,
                passes=meta.get("passes_per_run"),
            )
        )
    by_name = {r.name: r for r in results}
    for r, run in zip(results, meta["runs"]):
        r.after = by_name.get(run.get("after"))
        r.offset = len(r.after.metrics) if r.after else 0
    return meta, results


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _std(values):
    values = [v for v in values if v is not None]
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _fmt(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def _units(counts):
    return "—" if counts is None else "+".join(str(int(round(c))) for c in counts)


# -- which test images an evaluation used --------------------------------------------------

WHOLE, RANDOM, FIRST = "whole", "random", "first"
MARKS = {WHOLE: "", RANDOM: "†", FIRST: "‡"}
STAGE_END_MARK = "§"


def evaluated_images(evaluation: dict, dataset: str | None) -> tuple[str, int | None, int | None]:
    """``(kind, n, N)``: an evaluation on the whole test set of N images, on a seeded
    random subset of n of them, or (made before subsets were random: no
    ``test_subset_seed`` key) on the first n, which is never put beside the papers' numbers."""
    size = evaluation.get("test_set_size") or TEST_SIZES.get(dataset)
    n = evaluation.get("n_test")
    if n is None or size is None or n >= size:
        return WHOLE, n, size
    return (RANDOM if evaluation.get("test_subset_seed") is not None else FIRST), n, size


def _kind(r: RunResult) -> tuple[str, int | None, int | None]:
    return evaluated_images(r.evaluation, r.config.get("dataset"))


def _value_cell(
    runs: list[RunResult], key: str, digits: int = 2, spread: bool = False
) -> tuple[str, float | None]:
    """A table cell for the mean of ``key`` over ``runs`` (± the standard deviation over seeds
    if ``spread``), marked † for a random test subset, and "—‡" (no number) for an
    evaluation on the first test images; with the value put beside the paper's, or None."""
    if not runs:
        return "—", None
    kinds = {_kind(r)[0] for r in runs}
    if FIRST in kinds:
        return "—" + MARKS[FIRST], None
    values = [r.evaluation[key] for r in runs]
    mean, std = _mean(values), _std(values)
    text = _fmt(mean, digits) + ("" if not spread or std is None else f" ± {std:.{digits}f}")
    return text + (MARKS[RANDOM] if RANDOM in kinds else ""), mean


def _image_notes(results: list[RunResult], hidden: bool = True) -> list[str]:
    """Footnotes for the marks of :func:`_value_cell` (``hidden``: first-N numbers left out)
    or :func:`_marked`, one per kind of subset found."""
    subsets = sorted(
        {_kind(r) for r in results if r.evaluation is not None and _kind(r)[0] != WHOLE},
        key=lambda x: (x[0], x[1] or 0, x[2] or 0),
    )
    notes = []
    for kind, n, size in subsets:
        if kind == RANDOM:
            notes.append(
                f"{MARKS[RANDOM]} evaluated on a seeded random subset of {n:,} of the {size:,} test images."
            )
        elif not hidden:
            notes.append(
                f"{MARKS[FIRST]} evaluated on the first {n:,} of the {size:,} test images (not a fair sample "
                "of the test set: re-evaluate)."
            )
        else:
            notes.append(
                f"—{MARKS[FIRST]} evaluated on the first {n:,} of the {size:,} test images: re-evaluate "
                "(a first-N subset is not a fair sample and is not put beside the paper's numbers)."
            )
    return list(dict.fromkeys(notes))


def _images_text(meta: dict, results: list[RunResult]) -> str:
    """Which test images the finished runs were evaluated on, in words."""
    counts: dict[tuple, int] = {}
    for r in results:
        if r.evaluation is not None:
            counts[_kind(r)] = counts.get(_kind(r), 0) + 1
    if not counts:
        n = meta.get("n_test")
        return "the whole test set" if n is None else f"a seeded random subset of {n:,} test images"
    words = {k: _kind_words(*k) for k in counts}
    if len(counts) == 1:
        return next(iter(words.values()))
    return "; ".join(f"{c} run(s) on {words[k]}" for k, c in counts.items())


def _kind_words(kind, n, size) -> str:
    if kind == WHOLE:
        return "the whole test set"
    if kind == RANDOM:
        return f"a seeded random subset of {n:,} of the {size:,} test images ({MARKS[RANDOM]})"
    return (
        f"the first {n:,} test images (evaluated before test subsets were random: not comparable with the "
        "paper's numbers; re-evaluate)"
    )


# -- claims: margins and paired standard errors ----------------------------------------------

PER_IMAGE = {  # a quantity of evaluation.json from the per-image values of evaluation.safetensors
    "nll": lambda t: -t["log_px"],
    "log_px": lambda t: t["log_px"],
    "iwae64": lambda t: t["iwae64"],
    "elbo": lambda t: t["elbo"],
    "neg_kl_q_p": lambda t: t["iwae64"] - t["log_px"],
}


@dataclass(frozen=True)
class Margin:
    """The difference b − a of one quantity between two models: the mean over their common
    test images of the per-image differences, with its paired standard error (std of the
    differences / sqrt(n)); without per-image values, the difference of the two means and
    ``se`` None."""

    diff: float
    se: float | None = None
    n: int | None = None
    same_images: bool = True  # False: two means over different test images (no per-image values)


def _images(r: RunResult) -> dict[str, np.ndarray] | None:
    """The per-image values of ``r``'s evaluation as float64 arrays (read once), or None
    where there are none or they do not belong to its evaluation.json."""
    if not r._images_read:
        r._images_read = True
        from iwae.train import read_evaluation_images

        tensors = read_evaluation_images(r.run_dir) if r.run_dir is not None else None
        if tensors is not None and r.evaluation is not None:
            t = {
                k: v.numpy().astype(np.int64 if k == "test_index" else np.float64)
                for k, v in tensors.items()
            }
            if len(t["test_index"]) == r.evaluation.get("n_test", len(t["test_index"])):
                r._images = t
    return r._images


def _cell_images(runs: list[RunResult], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(test_index, values)``: per-image ``key`` averaged over ``runs`` (the seeds of one
    cell) on the test images they all share; None if a run has no per-image values."""
    tables = [_images(r) for r in runs]
    if not tables or any(t is None for t in tables):
        return None
    common = np.unique(
        reduce(np.intersect1d, [t["test_index"] for t in tables])
    )  # sorted, also for one run
    values = []
    for t in tables:
        _, where, _ = np.intersect1d(
            t["test_index"], common, assume_unique=True, return_indices=True
        )
        values.append(PER_IMAGE[key](t)[where])
    return common, np.mean(values, axis=0)


def paired_margin(a: list[RunResult], b: list[RunResult], key: str) -> Margin | None:
    """b − a in ``key`` (a quantity of :data:`PER_IMAGE`): paired over the test images both
    were evaluated on where both have per-image values, else the difference of their
    evaluation means (no standard error); None when either has no evaluation."""
    if not a or not b:
        return None
    pa, pb = _cell_images(a, key), _cell_images(b, key)
    if pa is not None and pb is not None:
        common, ia, ib = np.intersect1d(pa[0], pb[0], assume_unique=True, return_indices=True)
        if len(common) > 1:
            d = pb[1][ib] - pa[1][ia]
            return Margin(float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d))
    same = len({_kind(r) for r in a + b}) == 1
    return Margin(
        _mean([r.evaluation[key] for r in b]) - _mean([r.evaluation[key] for r in a]),
        same_images=same,
    )


HOLDS, FAILS, NOISE = "holds", "does not hold", "within noise"


def claim_verdict(m: Margin, expect: int) -> str:
    """``expect`` = +1 if the paper has b above a, -1 if below: "holds" if the margin is on
    the paper's side by more than 2 standard errors, "does not hold" if on the other by
    more than 2, else "within noise"; without a standard error, by the sign alone."""
    signed = expect * m.diff
    if m.se is None:
        return HOLDS if signed > 0 else FAILS
    return HOLDS if signed > 2 * m.se else FAILS if signed < -2 * m.se else NOISE


def _combined(verdicts: list[str]) -> str:
    """A claim over several pairs: fails if one fails, within noise if one is, else holds."""
    return FAILS if FAILS in verdicts else NOISE if NOISE in verdicts else HOLDS


def _claim_line(claim: str, detail: str, pairs: list[tuple[str, Margin, int]]) -> str:
    """``- claim — **verdict** (detail)``, then each pair's margin ± paired standard error
    and verdict, or that there are no per-image values. ``pairs``: (name of b − a, margin,
    expected sign)."""
    verdicts = [claim_verdict(m, e) for _, m, e in pairs]
    line = f"- {claim} — **{_combined(verdicts)}** ({detail})"
    apart = [name for name, m, _ in pairs if not m.same_images]
    if apart:
        line += f" [{', '.join(apart)}: the two evaluations used different test images]"
    if all(m.se is None for _, m, _ in pairs):
        return line + " — no per-image values: standard error unavailable"
    sizes = {m.n for _, m, _ in pairs if m.n}
    parts = []
    for (name, m, _), v in zip(pairs, verdicts):
        if m.se is None:
            parts.append(f"{name}: no per-image values, standard error unavailable")
        else:
            parts.append(
                f"{name} = {m.diff:+.2f} ± {m.se:.2f}{'' if len(sizes) == 1 else f' ({m.n:,} images)'} ({v})"
            )
    over = f" over {sizes.pop():,} test images" if len(sizes) == 1 else ""
    return line + f"; margin ± paired standard error{over}: " + ", ".join(parts)


def _lockstep_size(runner: dict) -> int:
    """How many runs trained in the run's lockstep group, by the ``lockstep`` key (1: alone)."""
    return len(runner.get("lockstep") or ()) or 1


def _training_by_device(r: RunResult) -> dict[str, float] | None:
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


def _process_seconds(r: RunResult) -> float:
    """A run's share of process time, training (:func:`_training_by_device`) and evaluation."""
    by_device = _training_by_device(r)
    train = (
        sum(by_device.values())
        if by_device
        else r.runner["train_wall_s"] / _lockstep_size(r.runner)
    )
    return train + r.runner.get("eval_wall_s", 0.0)


def _gpu_training(r: RunResult) -> tuple[dict[str, float], bool]:
    """Seconds of a run's training on each GPU (its share: :func:`_training_by_device`), and
    whether it trained on a CPU too; for runs trained before ``runner.json`` recorded the
    machine (keys such as ``cuda (NVIDIA H100 80GB HBM3)``), from ``summary.json``."""
    by_device = _training_by_device(r)
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


def _budget(meta: dict, results: list[RunResult]) -> str:
    done = sum(r.evaluation is not None for r in results)
    walls = [_process_seconds(r) for r in results if r.runner]
    text = (
        f"Budget: `--stages {meta['stages']}` ({meta['passes_per_run']} passes per run; the paper: 8 stages, "
        f"3,280 passes), {meta['seeds']} seed(s); NLL = −L_{meta['eval_k']} on {_images_text(meta, results)}. "
        f"{done} of {len(results)} runs finished"
    )
    filters = meta.get("only")
    if filters:  # only part of the grid was asked for
        from iwae.experiments import grid

        total = len(grid(meta["experiment"], meta["stages"], meta["seeds"]))
        if total > len(results):
            text += f" (selected with --only: {len(results)} of the grid's {total} runs)"
    gpu = {
        r.name: (seconds, cpu_too)
        for r in results
        for seconds, cpu_too in [_gpu_training(r)]
        if seconds
    }
    if walls:
        text += f", {sum(walls) / 3600:.1f} {'' if gpu else 'CPU-'}process hours in all (train + evaluate)"
    if gpu:
        names = sorted({name for seconds, _ in gpu.values() for name in seconds})
        minutes = sum(sum(seconds.values()) for seconds, _ in gpu.values()) / 60
        runs = ", ".join(
            name + (" (in part)" if cpu_too else "") for name, (_, cpu_too) in gpu.items()
        )
        text += f"; trained on a GPU ({', '.join(names)}): {runs}, {minutes:.0f} GPU minutes of training in all"
    lost = [r.name for r in results if r.summary and r.summary.get("recovered")]
    if lost:
        text += f"; per-pass metrics lost (`recovered` in `summary.json`): {', '.join(lost)}"
    if meta.get("overrides"):
        text += f". Every run with {json.dumps(meta['overrides'])}"
    return text + "."


def _group(results, keys):
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        if r.evaluation is not None:
            groups.setdefault(tuple(r.label[k] for k in keys), []).append(r)
    return groups


def _paper_table1() -> dict:
    return {
        (r["dataset"], r["stochastic_layers"], r["k"], r["objective"]): r
        for r in _rows(paper_tables()["burda2016_table1"])
    }


def _table1_section(meta, results, fig_dir: Path) -> list[str]:
    paper = _paper_table1()
    cells = _group(results, ("dataset", "layers", "k", "objective"))

    def units(key):
        runs = cells.get(key, [])
        return (
            [float(np.mean(c)) for c in zip(*[r.evaluation["active_units"] for r in runs])]
            if runs
            else None
        )

    datasets = {r.label["dataset"] for r in results}
    lines = [
        f"## Burda et al. (2016), Table 1 ({', '.join(d.upper() for d in ('mnist', 'omniglot') if d in datasets)})"
        + (f", {meta['passes_per_run']:,} passes" if meta.get("_several_budgets") else ""),
        "",
        _budget(meta, results),
        "",
        "| dataset | layers | k | VAE NLL | paper | Δ | IWAE NLL | paper | Δ | VAE units | paper | IWAE units | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    in_grid = {(r.label["dataset"], r.label["layers"]) for r in results}
    for dataset in ("mnist", "omniglot"):
        for layers in (1, 2):
            if (dataset, layers) not in in_grid:
                continue
            for k in (1, 5, 50):
                row = [dataset, str(layers), str(k)]
                for obj in ("vae", "iwae"):
                    text, ours = _value_cell(cells.get((dataset, layers, k, obj), []), "nll")
                    ref = paper[(dataset, layers, k, obj)]["nll"]
                    row += [text, _fmt(ref), _fmt(None if ours is None else ours - ref)]
                for obj in ("vae", "iwae"):
                    row += [
                        _units(units((dataset, layers, k, obj))),
                        paper[(dataset, layers, k, obj)]["active_units"],
                    ]
                lines.append("| " + " | ".join(row) + " |")
            checks += _table1_checks(dataset, layers, cells, units)
    notes = _image_notes(results)
    lines += ([""] + notes if notes else []) + ["", "Orderings of the paper, at this budget:", ""]
    lines += (checks or ["- not enough finished runs yet"]) + [""]
    lines += _figures(meta, results, fig_dir, "table1")
    return lines


def _table1_checks(dataset, layers, cells, units) -> list[str]:
    """Burda et al. Table 1: IWAE below the VAE in NLL at every k > 1, IWAE NLL falling
    with k (both with paired standard errors), IWAE with at least as many active units."""
    return [
        line
        for line in (
            _iwae_below_vae(dataset, layers, cells),
            _falling_with_k(dataset, layers, cells),
            _more_active_units(dataset, layers, units),
        )
        if line
    ]


def _nll_of(cells, key):
    return _mean([r.evaluation["nll"] for r in cells.get(key, [])])


def _iwae_below_vae(dataset, layers, cells) -> str | None:
    pairs = [
        (k, cells.get((dataset, layers, k, "vae"), []), cells.get((dataset, layers, k, "iwae"), []))
        for k in (5, 50)
    ]
    pairs = [(k, vae, iwae) for k, vae, iwae in pairs if vae and iwae]
    if not pairs:
        return None
    detail = ", ".join(
        f"k={k}: IWAE {_nll_of(cells, (dataset, layers, k, 'iwae')):.2f} vs "
        f"VAE {_nll_of(cells, (dataset, layers, k, 'vae')):.2f}"
        for k, _, _ in pairs
    )
    margins = [
        (f"k={k}: IWAE − VAE", paired_margin(vae, iwae, "nll"), -1) for k, vae, iwae in pairs
    ]
    return _claim_line(
        f"{dataset}, {layers} layer(s): IWAE below VAE in NLL for every k > 1", detail, margins
    )


def _falling_with_k(dataset, layers, cells) -> str | None:
    ks = [k for k in (1, 5, 50) if cells.get((dataset, layers, k, "iwae"))]
    if len(ks) < 2:
        return None
    detail = ", ".join(f"k={k}: {_nll_of(cells, (dataset, layers, k, 'iwae')):.2f}" for k in ks)
    runs = {k: cells[(dataset, layers, k, "iwae")] for k in ks}
    margins = [
        (f"k={b} − k={a}", paired_margin(runs[a], runs[b], "nll"), -1) for a, b in pairwise(ks)
    ]
    return _claim_line(f"{dataset}, {layers} layer(s): IWAE NLL falling with k", detail, margins)


def _more_active_units(dataset, layers, units) -> str | None:
    au = [
        (k, units((dataset, layers, k, "iwae")), units((dataset, layers, k, "vae")))
        for k in (1, 5, 50)
    ]
    au = [p for p in au if None not in p]
    if not au:
        return None
    ok = all(sum(i) >= sum(v) for _, i, v in au)
    detail = ", ".join(f"k={k}: {_units(i)} vs {_units(v)}" for k, i, v in au)
    return (
        f"- {dataset}, {layers} layer(s): IWAE with at least as many active units as VAE — "
        f"**{'holds' if ok else 'does not hold'}** ({detail}; counts of units, no standard error)"
    )


def _two_stage_section(meta, results, fig_dir: Path) -> list[str]:
    paper = {r["experiment"]: r for r in _rows(paper_tables()["burda2016_two_stage"])}
    cells = _group(results, ("experiment", "stage"))
    lines = [
        "## Burda et al. (2016), two-stage training (MNIST, 1 layer)",
        "",
        _budget(meta, results),
        f"The second stage runs {3 ** (meta['stages'] - 1)} passes at learning rate 1e-4 (the paper: 3^7 = 2,187).",
        "",
        "| experiment | first stage | NLL | paper | units | paper | second stage | NLL | paper | units | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for exp in (1, 2):
        ref = paper[exp]
        row = [str(exp)]
        for stage, name_key, nll_key, au_key in (
            ("first", "first_stage", "first_nll", "first_active_units"),
            ("second", "second_stage", "second_nll", "second_active_units"),
        ):
            runs = cells.get((exp, stage), [])
            nll = _value_cell(runs, "nll")[0]
            au = (
                [float(np.mean(c)) for c in zip(*[r.evaluation["active_units"] for r in runs])]
                if runs
                else None
            )
            row += [ref[name_key], nll, _fmt(ref[nll_key]), _units(au), str(ref[au_key])]
        lines.append("| " + " | ".join(row) + " |")
    checks = _two_stage_checks(cells, paper)
    notes = _image_notes(results)
    lines += ([""] + notes if notes else []) + ["", "What the paper shows, at this budget:", ""]
    lines += (checks or ["- not enough finished runs yet"]) + [""]
    lines += _figures(meta, results, fig_dir, "two-stage")
    return lines


def _two_stage_checks(cells, paper) -> list[str]:
    """Burda et al. sec. 5.2: IWAE after a VAE lowers the NLL and adds active units; a VAE
    after IWAE raises the NLL and removes active units."""
    out = []
    for exp, better in ((1, True), (2, False)):
        first, second = cells.get((exp, "first"), []), cells.get((exp, "second"), [])
        if not (first and second):
            continue
        ref = paper[exp]
        a, b = (
            _mean([r.evaluation["nll"] for r in first]),
            _mean([r.evaluation["nll"] for r in second]),
        )
        ua, ub = (
            float(np.mean([sum(r.evaluation["active_units"]) for r in runs]))
            for runs in (first, second)
        )
        then = f"{ref['first_stage']} then {ref['second_stage']}"
        claim = (
            f"{then}: the second stage {'lowers' if better else 'raises'} the NLL (paper {ref['first_nll']:.2f} → "
            f"{ref['second_nll']:.2f})"
        )
        margin = paired_margin(first, second, "nll")
        out.append(
            _claim_line(
                claim, f"{a:.2f} → {b:.2f}", [("second − first", margin, -1 if better else 1)]
            )
        )
        ok = ub > ua if better else ub < ua
        out.append(
            f"- {then}: the second stage {'adds' if better else 'removes'} active units (paper "
            f"{ref['first_active_units']} → {ref['second_active_units']}) — **{'holds' if ok else 'does not hold'}** "
            f"({ua:.0f} → {ub:.0f})"
        )
    return out


def _variants_section(meta, results, fig_dir: Path) -> list[str]:
    paper = {r["method"]: r for r in _rows(paper_tables()["rainforth2018_variants"])}
    cells = _group(results, ("method",))
    lines = [
        "## Rainforth et al. (2018), IWAE variants (MNIST, 1 layer, 64 samples per example)",
        "",
        _budget(meta, results) + " Mean ± standard deviation over seeds.",
        "",
        "| method | IWAE-64 | paper | log p̂(x) | paper | −KL(Q‖P) | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, paper_key, _ in _variant_names():
        runs = cells.get((method,), [])
        ref = paper[paper_key]
        row = [method]
        for key in ("iwae64", "log_px", "neg_kl_q_p"):
            row += [
                _value_cell(runs, key, spread=True)[0],
                f"{ref[key]:.2f} ± {ref[key + '_std']:.2f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    checks = _variants_checks(cells)
    notes = _image_notes(results)
    lines += ([""] + notes if notes else []) + [
        "",
        "What the paper shows, at this budget (means over seeds):",
        "",
    ]
    lines += (checks or ["- not enough finished runs yet"]) + [""]
    lines += _figures(meta, results, fig_dir, "variants")
    return lines


def _variants_checks(cells) -> list[str]:
    """Rainforth et al. 2018, Table 1: PIWAE, MIWAE and CIWAE beat IWAE in IWAE-64; every
    other method has a better inference network (higher -KL(Q||P)) than IWAE; the VAE has
    the worst generative model (lowest log p-hat(x))."""

    def value(method, key):
        runs = cells.get((method,), [])
        return _mean([r.evaluation[key] for r in runs]) if runs else None

    def runs(method):
        return cells.get((method,), [])

    methods = [m for m, _, _ in _variant_names()]
    out = []
    for claim, key, others in (
        (
            "PIWAE, MIWAE and CIWAE above IWAE in IWAE-64 (paper: −85.60 to −86.08 vs −86.11)",
            "iwae64",
            [m for m in methods if m not in ("IWAE", "VAE")],
        ),
        (
            "every other method above IWAE in −KL(Q‖P), a better inference network (paper: −0.47 to −1.34 vs −1.59)",
            "neg_kl_q_p",
            [m for m in methods if m != "IWAE"],
        ),
    ):
        base = value("IWAE", key)
        pairs = [(m, v) for m in others if (v := value(m, key)) is not None]
        if base is None or not pairs:
            continue
        detail = f"IWAE {base:.2f}; " + ", ".join(f"{m} {v:.2f}" for m, v in pairs)
        margins = [(f"{m} − IWAE", paired_margin(runs("IWAE"), runs(m), key), 1) for m, _ in pairs]
        out.append(_claim_line(claim, detail, margins))
    vae = value("VAE", "log_px")
    pairs = [(m, v) for m in methods if m != "VAE" and (v := value(m, "log_px")) is not None]
    if vae is not None and pairs:
        detail = f"VAE {vae:.2f}; " + ", ".join(f"{m} {v:.2f}" for m, v in pairs)
        margins = [
            (f"VAE − {m}", paired_margin(runs(m), runs("VAE"), "log_px"), -1) for m, _ in pairs
        ]
        out.append(
            _claim_line(
                "the VAE lowest in log p̂(x), the worst generative model (paper: −86.21 vs −84.40 to "
                "−85.24)",
                detail,
                margins,
            )
        )
    return out


def _variant_names():
    from iwae.experiments import VARIANTS

    return VARIANTS


def _dreg_section(meta, results, fig_dir: Path) -> list[str]:
    cells = _group(results, ("layers", "k", "estimator"))
    lines = [
        "## Beyond the papers: IWAE with the DReG encoder gradient (MNIST)",
        "",
        _budget(meta, results),
        "",
        (
            "| layers | k | NLL, standard | NLL, DReG | DReG − standard | IWAE-64, standard | IWAE-64, DReG | "
            "units, standard | units, DReG |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layers in (1, 2):
        for k in (5, 50):
            std, dr = cells.get((layers, k, "reparam"), []), cells.get((layers, k, "dreg"), [])
            if std or dr:
                lines.append(_dreg_row(layers, k, std, dr))
    notes = _image_notes(results, hidden=False)
    lines += ([""] + notes if notes else []) + [
        "",
        (
            "A negative difference means DReG reached a lower (better) test NLL at the same budget; ± its paired "
            "standard error over the test images both were evaluated on (where per-image values exist)."
        ),
        "",
    ]
    lines += _figures(meta, results, fig_dir, "dreg")
    return lines


def _dreg_row(layers, k, std: list[RunResult], dr: list[RunResult]) -> str:
    """One row of the DReG table: NLL, their paired difference, IWAE-64 and units of each."""
    diff = paired_margin(std, dr, "nll")
    diff = (
        "—" if diff is None else _fmt(diff.diff) + ("" if diff.se is None else f" ± {diff.se:.2f}")
    )
    units = [_units(runs[0].evaluation["active_units"]) if runs else "—" for runs in (std, dr)]
    cells = [
        _marked(std, "nll"),
        _marked(dr, "nll"),
        diff,
        _marked(std, "iwae64"),
        _marked(dr, "iwae64"),
        *units,
    ]
    return f"| {layers} | {k} | " + " | ".join(cells) + " |"


def _marked(runs: list[RunResult], key: str) -> str:
    """The mean of ``key`` over ``runs`` marked with the test images it was made on (†, ‡),
    for tables without the papers' numbers."""
    if not runs:
        return "—"
    kinds = {_kind(r)[0] for r in runs}
    mark = MARKS[FIRST] if FIRST in kinds else MARKS[RANDOM] if RANDOM in kinds else ""
    return _fmt(_mean([r.evaluation[key] for r in runs])) + mark


# -- Table 1 across budgets: the budget ladder ------------------------------------------------


def _ladder_sections(experiments: list[tuple[dict, list[RunResult]]], fig_dir: Path) -> list[str]:
    """A budget ladder for each dataset, from the runs of every table1 experiment directory."""
    runs = [r for meta, results in experiments if meta["experiment"] == "table1" for r in results]
    lines = []
    for dataset in ("mnist", "omniglot"):
        mine = [r for r in runs if r.label["dataset"] == dataset]
        if mine:
            lines += _ladder_section(dataset, mine, fig_dir)
    return lines


def _ladder_section(dataset: str, runs: list[RunResult], fig_dir: Path) -> list[str]:
    """Rows: Table 1's cells; columns: every budget found (passes), the paper's NLL and the
    distance to it from the largest budget with a number; then the notes and the figure."""
    paper, budgets = _paper_table1(), _ladder_budgets(runs)
    cells: dict[tuple, list[RunResult]] = {}
    for r in runs:
        cells.setdefault((r.label["layers"], r.label["k"], r.label["objective"]), []).append(r)
    order = sorted(cells, key=lambda c: (c[0], c[1], c[2] != "vae"))
    sources = sorted(
        {(r.passes or 0, r.run_dir.parent.parent.name) for r in runs if r.run_dir is not None}
    )
    lines = [
        f"## Burda et al. (2016), Table 1 across budgets ({dataset.upper()}): the budget ladder",
        "",
        (
            f"Test NLL (nats) of each cell after each training budget found, in passes over the training set (the "
            f"paper: 3,280), from {', '.join(f'`{name}/` ({p:,} passes)' for p, name in sources)}."
        ),
        "",
        "| layers | k | objective | "
        + " | ".join(f"{b:,} passes" for b in budgets)
        + " | paper (3,280 passes) | Δ to the paper |",
        "|---|---|---|" + "---|" * len(budgets) + "---|---|",
    ]
    lines += [_ladder_row(dataset, cell, cells[cell], budgets, paper) for cell in order]
    lines += [""] + _ladder_notes(runs, budgets) + [""]
    fig_dir.mkdir(parents=True, exist_ok=True)
    name = f"table1-ladder-{dataset}.png"
    _plot_ladder(dataset, runs, paper, fig_dir / name)
    return lines + [f"![test NLL against passes, {dataset.upper()}]({fig_dir.name}/{name})", ""]


def _ladder_budgets(runs: list[RunResult]) -> list[int]:
    """The ladder's columns: every experiment's passes per run, and every stage end (with a
    logged ``test_nll_subset``) from the smallest of those on."""
    finals = {r.passes for r in runs if r.passes}
    ends = {m["pass"] for r in runs for m in r.metrics if "test_nll_subset" in m}
    return sorted(finals | {p for p in ends if p >= min(finals, default=1)})


def _stage_end_values(runs: list[RunResult], budget: int) -> list[float]:
    return [
        m["test_nll_subset"]
        for r in runs
        for m in r.metrics
        if m.get("pass") == budget and "test_nll_subset" in m
    ]


def _ladder_point(runs: list[RunResult], budget: int) -> tuple[str, float | None]:
    """One cell at one budget: the final evaluations of its runs trained for ``budget``
    passes (:func:`_value_cell`), else the mean stage-end ``test_nll_subset`` logged at that
    pass (marked §); with the value put beside the paper's, or None."""
    text, value = _value_cell(
        [r for r in runs if r.passes == budget and r.evaluation is not None], "nll"
    )
    if value is None and (subset := _stage_end_values(runs, budget)):
        return _fmt(_mean(subset)) + STAGE_END_MARK, _mean(subset)
    return text, value


def _ladder_row(dataset, cell, runs, budgets, paper) -> str:
    layers, k, objective = cell
    points = [_ladder_point(runs, b) for b in budgets]
    ref = paper[(dataset, layers, k, objective)]["nll"]
    found = [(b, v) for b, (_, v) in zip(budgets, points) if v is not None]
    delta = f"{found[-1][1] - ref:+.2f} at {found[-1][0]:,} passes" if found else "—"
    return (
        "| "
        + " | ".join(
            [str(layers), str(k), objective.upper(), *(t for t, _ in points), _fmt(ref), delta]
        )
        + " |"
    )


def _ladder_notes(runs: list[RunResult], budgets: list[int]) -> list[str]:
    """What the ladder's plain numbers and marks mean."""
    notes = [
        "Plain numbers: the final evaluation (−L_5000 on the whole test set, `evaluation.json`), the mean "
        + "over seeds where there are several."
    ]
    finals = [r for r in runs if r.evaluation is not None and r.passes in budgets]
    notes += _image_notes(finals)
    stage_ends = {
        (m.get("test_nll_subset_k"), m.get("test_nll_subset_n"))
        for r in runs
        for m in r.metrics
        if "test_nll_subset" in m and m["pass"] in budgets
    }
    for k, n in sorted(stage_ends, key=str):
        notes.append(
            f"{STAGE_END_MARK} no final evaluation at this budget (yet): −L_{k} at the end of the training stage "
            f"on a seeded random subset of {n:,} test images (`test_nll_subset` in `metrics.jsonl`)."
        )
    notes.append("Δ: our latest number minus the paper's (after 3,280 passes).")
    return [n + "  " for n in notes[:-1]] + notes[-1:]


K_COLOURS = {1: "tab:blue", 5: "tab:orange", 50: "tab:green"}
OBJECTIVE_STYLES = {"vae": "--", "iwae": "-"}
PAPER_PASSES = 3280
STAGE_ENDS = [sum(3**j for j in range(i + 1)) for i in range(8)]  # 1, 4, 13, ..., 3,280


def _ladder_curve(r: RunResult) -> list[tuple[int, float]]:
    """A run's stage-end ``test_nll_subset`` against passes."""
    return [
        (r.offset + m["pass"], m["test_nll_subset"]) for m in r.metrics if "test_nll_subset" in m
    ]


def _final_point(r: RunResult) -> tuple[int, float] | None:
    """A run's final evaluation at its budget, unless made on the first test images."""
    if r.evaluation is None or r.passes is None or _kind(r)[0] == FIRST:
        return None
    return r.passes, r.evaluation["nll"]


def _plot_ladder(dataset: str, runs: list[RunResult], paper: dict, path: Path) -> None:
    """Test NLL against passes (log scale), one panel per number of stochastic layers:
    colour by k, dashed VAE and solid IWAE; circles the stage-end subset values, squares
    the final evaluations, stars the paper's values at 3,280 passes."""
    plt = _plt()
    layers = sorted({r.label["layers"] for r in runs})
    fig, axes = plt.subplots(
        1, len(layers), figsize=(5.2 * len(layers), 4.2), squeeze=False, sharey=True
    )
    for ax, n_layers in zip(axes[0], layers):
        mine = [r for r in runs if r.label["layers"] == n_layers]
        for r in mine:
            _plot_ladder_run(ax, r)
        for k, objective in sorted({(r.label["k"], r.label["objective"]) for r in mine}):
            ax.plot(
                [PAPER_PASSES],
                [paper[(dataset, n_layers, k, objective)]["nll"]],
                marker="*",
                ms=11,
                color=K_COLOURS.get(k, "k"),
                mfc="none" if objective == "vae" else K_COLOURS.get(k, "k"),
            )
        ax.set_xscale("log")
        ax.set_xticks(STAGE_ENDS, [f"{p:,}" for p in STAGE_ENDS])
        ax.set_xlabel("passes over the training set (stage ends)")
        ax.set_title(f"{dataset.upper()}, {n_layers} stochastic layer{'s' if n_layers > 1 else ''}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("test NLL (nats)")
    axes[0][-1].legend(
        handles=_ladder_legend(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0)
    )
    _save(fig, path)


def _plot_ladder_run(ax, r: RunResult) -> None:
    colour, style = (
        K_COLOURS.get(r.label["k"], "k"),
        OBJECTIVE_STYLES.get(r.label["objective"], ":"),
    )
    curve = _ladder_curve(r)
    if curve:
        ax.plot(*zip(*curve), ls=style, marker="o", ms=3, color=colour)
    final = _final_point(r)
    if final:
        ax.plot([final[0]], [final[1]], marker="s", ms=6, color=colour, ls="none")


def _ladder_legend() -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2, label=f"k={k}") for k, c in K_COLOURS.items()]
    handles += [
        Line2D([], [], color="k", ls=s, label=o.upper()) for o, s in OBJECTIVE_STYLES.items()
    ]
    handles += [
        Line2D(
            [], [], color="gray", marker="o", ms=4, ls="none", label="stage end, random test subset"
        ),
        Line2D([], [], color="gray", marker="s", ms=6, ls="none", label="final evaluation"),
        Line2D(
            [],
            [],
            color="gray",
            marker="*",
            ms=10,
            ls="none",
            label="the paper, 3,280 passes (hollow: VAE)",
        ),
    ]
    return handles


SECTIONS = {
    "table1": _table1_section,
    "two-stage": _two_stage_section,
    "variants": _variants_section,
    "dreg": _dreg_section,
}


# -- figures -----------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _figures(meta, results, fig_dir: Path, exp: str) -> list[str]:
    lines = []
    finished = [r for r in results if r.evaluation is not None]
    if not finished:
        return lines
    fig_dir.mkdir(parents=True, exist_ok=True)
    rel = fig_dir.name
    exp = meta.get(
        "_figure_prefix", exp
    )  # the directory's name: two table1 directories do not collide
    if _plot_curves(finished, fig_dir / f"{exp}-curves.png"):
        lines += [f"![learning curves]({rel}/{exp}-curves.png)", ""]
    _plot_activity(finished, fig_dir / f"{exp}-activity.png")
    lines += [
        f"![unit activity]({rel}/{exp}-activity.png)",
        "",
        "Samples from each model: "
        + ", ".join(
            f"[{r.name}]({rel}/samples/{exp}-{r.name}.png)"
            for r in finished
            if _save_samples(r, meta, fig_dir, f"{exp}-{r.name}.png")
        ),
        "",
    ]
    return lines


CURVE_KEYS = [
    ("test_iwae64", "test IWAE-64"),
    ("test_log_px", "test log p̂(x)"),
    ("test_neg_kl_q_p", "test −KL(Q‖P)"),
]
#: line styles of the label that tells lines apart by style (the objective, else the estimator)
LINE_STYLES = {
    "objective": OBJECTIVE_STYLES,
    "estimator": {"reparam": "-", "dreg": "--", "stl": ":"},
}
#: label keys that never tell curves apart: seeds are averaged, dataset and layers make the panels
_NOT_CURVE_KEYS = ("seed", "dataset", "layers")


def _plot_curves(results: list[RunResult], path: Path) -> bool:
    """The learning-curve figure (:func:`curves_figure`) saved to ``path``; False if no run
    logged a test bound."""
    fig = curves_figure(results)
    if fig is None:
        return False
    _save(fig, path)
    return True


def curves_figure(results: list[RunResult]):
    """Test bounds logged during training against passes, as small multiples: one column per
    dataset x stochastic layers, one row per logged bound (IWAE-64; with ``curve_k`` also
    log p̂(x) and −KL(Q‖P)). Within a panel the colour tells k apart (or whatever else
    varies: the variant, the stage), never repeated, and the line style the objective (or
    the estimator); seeds are averaged. The legend lists the lines in a fixed order. None if
    no run logged any bound."""
    keys = [k for k in CURVE_KEYS if any(k[0] in m for r in results for m in r.metrics)]
    if not keys:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    style_key, colour_keys = _curve_keys(results)
    panels = sorted({_panel(r) for r in results}, key=str)
    order = _style_order(style_key)
    lines = sorted(
        {_curve_line(r, style_key, colour_keys) for r in results},
        key=lambda l: (_value_order(l[0]), order(l[1])),
    )
    colours = _curve_colours(sorted({colour for colour, _ in lines}, key=_value_order), colour_keys)
    styles = _curve_styles(sorted({style for _, style in lines}, key=order), style_key)
    single = len(panels) == 1  # one panel per bound, side by side
    shape = (1, len(keys)) if single else (len(keys), len(panels))
    fig, axes = plt.subplots(*shape, figsize=(4.8 * shape[1], 3.4 * shape[0]), squeeze=False)
    for row, (key, title) in enumerate(keys):
        for col, panel in enumerate(panels):
            ax = axes[0][row] if single else axes[row][col]
            for colour, style in lines:
                runs = [
                    r
                    for r in results
                    if _panel(r) == panel
                    and _curve_line(r, style_key, colour_keys) == (colour, style)
                ]
                xs, ys = _mean_curve(runs, key)
                if xs:
                    ax.plot(
                        xs,
                        ys,
                        marker="o",
                        ms=3,
                        color=colours[colour],
                        ls=styles[style],
                        label=_line_label(colour, style, colour_keys, style_key),
                    )
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
            ax.grid(alpha=0.3, which="both")
            if single or row == 0:
                ax.set_title(_panel_title(panel))
            if single or row == len(keys) - 1:
                ax.set_xlabel("passes over the training set")
            if single or col == 0:
                ax.set_ylabel(f"{title} (nats, test subset)")
    handles = [
        Line2D(
            [],
            [],
            color=colours[c],
            ls=styles[s],
            marker="o",
            ms=3,
            label=_line_label(c, s, colour_keys, style_key),
        )
        for c, s in lines
    ]
    axes[0][-1].legend(
        handles=handles, fontsize=7, handlelength=3, loc="upper left", bbox_to_anchor=(1.02, 1.0)
    )
    fig.tight_layout()
    return fig


def _curve_keys(results: list[RunResult]) -> tuple[str | None, tuple[str, ...]]:
    """The label key drawn as line style (the objective, else the estimator, where it varies)
    and the label keys drawn as colour (the others that vary, e.g. k)."""
    varying = [
        k
        for k in results[0].label
        if k not in _NOT_CURVE_KEYS and len({str(r.label.get(k)) for r in results}) > 1
    ]
    style_key = next((k for k in LINE_STYLES if k in varying), None)
    return style_key, tuple(k for k in varying if k != style_key)


def _panel(r: RunResult) -> tuple:
    return r.label.get("dataset", r.config.get("dataset", "mnist")), r.label.get(
        "layers", r.config.get("layers", 1)
    )


def _panel_title(panel: tuple) -> str:
    dataset, layers = panel
    return f"{str(dataset).upper()}, {layers} stochastic layer{'s' if layers != 1 else ''}"


def _curve_line(r: RunResult, style_key: str | None, colour_keys: tuple[str, ...]) -> tuple:
    """``(colour value, style value)`` of a run's line: runs with equal values are averaged."""
    return tuple(r.label.get(k) for k in colour_keys), r.label.get(style_key) if style_key else None


def _value_order(value):
    """Numbers in numeric order, then the rest in text order (k=5 before k=50)."""
    items = value if isinstance(value, tuple) else (value,)
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in items)


def _style_order(style_key: str | None):
    """Sort key of style values: those of :data:`LINE_STYLES` in its order (VAE before IWAE), then the rest."""
    known = list(LINE_STYLES.get(style_key, {}))
    return lambda v: (known.index(v), ()) if v in known else (len(known), _value_order(v))


def _curve_colours(values: list[tuple], colour_keys: tuple[str, ...]) -> dict:
    """One colour per colour value, never two alike: k in :data:`K_COLOURS` keeps its colour
    (as in the budget-ladder figure), the other values take the next unused colours of
    tab10 (tab20 beyond ten values, then evenly spaced hues)."""
    import matplotlib

    fixed = {(k,): c for k, c in K_COLOURS.items()} if colour_keys == ("k",) else {}
    palette = list(matplotlib.colormaps["tab10" if len(values) <= 10 else "tab20"].colors)
    if len(values) > len(palette):
        palette = [matplotlib.colormaps["hsv"](i / len(values)) for i in range(len(values))]
    named = {matplotlib.colors.to_rgba(c) for v, c in fixed.items() if v in values}
    free = iter(c for c in palette if matplotlib.colors.to_rgba(c) not in named)
    return {v: fixed[v] if v in fixed else next(free) for v in values}


def _curve_styles(values: list, style_key: str | None) -> dict:
    fixed = LINE_STYLES.get(style_key, {})
    spare = iter(s for s in ("-", "--", ":", "-.") if s not in {fixed.get(v) for v in values})
    return {v: fixed[v] if v in fixed else next(spare, "-") for v in values}


def _line_label(colour: tuple, style, colour_keys: tuple[str, ...], style_key: str | None) -> str:
    parts = [str(v) if k == "method" else f"{k}={v}" for k, v in zip(colour_keys, colour)]
    if style_key is not None:
        parts.append(str(style).upper() if style_key == "objective" else str(style))
    return " ".join(parts) or "all runs"


def _mean_curve(runs: list[RunResult], key: str) -> tuple[list[int], list[float]]:
    """``key`` against passes, averaged over ``runs`` (seeds) at each logged pass; a second
    stage's line starts where its first stage ended."""
    points: dict[int, list[float]] = {}
    for r in runs:
        logged = [(r.offset + m["pass"], m[key]) for m in r.metrics if key in m]
        if r.after is not None and logged:
            first = [(r.after.offset + m["pass"], m[key]) for m in r.after.metrics if key in m]
            logged = first[-1:] + logged
        for x, value in logged:
            points.setdefault(x, []).append(value)
    xs = sorted(points)
    return xs, [float(np.mean(points[x])) for x in xs]


def _plot_activity(results: list[RunResult], path: Path) -> None:
    plt = _plt()
    with_activity = [r for r in results if r.activity]
    n = len(with_activity)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, with_activity):
        for layer, activity in enumerate(r.activity):
            values = np.sort(np.asarray(activity))[::-1]
            ax.plot(
                np.arange(1, len(values) + 1), np.maximum(values, 1e-8), label=f"layer {layer + 1}"
            )
        ax.axhline(0.01, color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{r.name}\nactive {_units(r.evaluation['active_units'])}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("sorted unit activity Cov_x(E_q[u]) (log scale; dashed: 0.01)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save_samples(r: RunResult, meta, fig_dir: Path, name: str) -> bool:
    import torch

    from iwae.errors import IwaeError
    from iwae.train import WEIGHTS_FILE, load_run

    path = fig_dir / "samples" / name
    weights = Path(meta["_dir"]) / "runs" / r.name / WEIGHTS_FILE
    if path.exists() and weights.exists() and path.stat().st_mtime >= weights.stat().st_mtime:
        return True  # drawn from these weights already
    try:
        config, model = load_run(Path(meta["_dir"]) / "runs" / r.name)
    except IwaeError:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(
        model.sample_images(64, torch.Generator().manual_seed(0)).numpy(),
        path,
        shape=config.image_shape,
    )
    return True


def write_report(directory: str | Path) -> Path:
    """Write ``directory/REPORT.md`` for every experiment directory in or under ``directory``."""
    from iwae.errors import IwaeError

    directory = Path(directory)
    if not directory.is_dir():
        raise IwaeError(f"{directory} does not exist")
    exp_dirs = sorted(
        {
            p.parent
            for p in [*directory.glob("experiment.json"), *directory.glob("*/experiment.json")]
        }
    )
    if not exp_dirs:
        raise IwaeError(
            f"no experiment.json in {directory} or its subdirectories: run `iwae reproduce` first"
        )
    lines = [
        "# Reproduction report",
        "",
        "Generated by `iwae report` from the runs below; every number is from a run in this directory.",
        "",
    ]
    fig_dir = directory / "figures"
    experiments = [(load_experiment(d), d) for d in exp_dirs]
    order = list(SECTIONS)
    experiments.sort(key=lambda e: order.index(e[0][0]["experiment"]))
    ladder = _ladder_sections([e for e, _ in experiments], fig_dir)
    table1 = [
        (m["passes_per_run"], r.label["dataset"])
        for (m, res), _ in experiments
        if m["experiment"] == "table1"
        for r in res
    ]
    several = (
        len({p for p, _ in set(table1)}) > 1
    )  # table1 directories at different budgets: headings say which
    for (meta, results), exp_dir in experiments:
        if (
            meta["experiment"] == "table1" and ladder
        ):  # the ladder first, then each table1 directory
            lines, ladder = lines + ladder, []
        meta["_dir"] = str(exp_dir)
        meta["_several_budgets"] = several
        meta["_figure_prefix"] = exp_dir.name if exp_dir != directory else meta["experiment"]
        section = SECTIONS[meta["experiment"]](meta, results, fig_dir)
        lines += section + [
            f"Runs: `{exp_dir.relative_to(directory) if exp_dir != directory else '.'}/runs/`",
            "",
        ]
    lines += ais_section(directory)
    path = directory / REPORT_FILE
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))
    return path


# -- AIS and BDMC (iwae evaluate --method ais, iwae bdmc) ---------------------------------------

AIS_DIR = "ais"


def ais_section(directory: Path) -> list[str]:
    """The section on log p(x) beyond L_5000, from ``directory/ais/*/ais.json`` (``iwae evaluate
    --method ais --out``) and ``directory/ais/*/bdmc.json`` (``iwae bdmc --out``, with its
    figure ``bdmc.png``); no lines where there are none."""
    from iwae.rundir import AIS_FILE, BDMC_FIGURE, BDMC_FILE

    runs = sorted(p for p in (Path(directory) / AIS_DIR).glob("*") if p.is_dir())
    ais = [(p.name, _read_json(p / AIS_FILE)) for p in runs]
    ais = [(name, r) for name, r in ais if isinstance(r, dict) and "log_px_ais" in r]
    bdmc = [(p, _read_json(p / BDMC_FILE)) for p in runs]
    bdmc = [(p, r) for p, r in bdmc if isinstance(r, dict) and "lower" in r]
    if not ais and not bdmc:
        return []
    lines = [
        "## log p(x) beyond L_5000: annealed importance sampling and BDMC",
        "",
        "AIS (`iwae evaluate --method ais`) is a stochastic lower bound on log p(x), like L_5000 but "
        "tighter as the annealing steps T grow; its gap to L_5000 is measured on the same test images "
        "(paired standard error). BDMC (`iwae bdmc`) brackets log p(x) of images simulated from the "
        "model between forward AIS (lower) and reverse AIS from the exact latents (upper).",
        "",
    ]
    if ais:
        lines += [
            "| model | test images | T | chains | leapfrog | from | HMC acceptance | L_5000 | log p(x) by AIS "
            "| AIS − L_5000 | time |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in ais:
            lines.append(
                f"| {name} | {r['n_test']:,} | {r['ais_steps']} | {r['chains']} | {r['hmc_leapfrog']} | {r['ais_init']} "
                f"| {_fmt(r.get('ais_acceptance'))} | {r['log_px_iwae']:.2f} | {r['log_px_ais']:.2f} ± "
                f"{r['log_px_ais_stderr']:.2f} | {r['ais_gap']:+.2f} ± {r['ais_gap_stderr']:.2f} | {r['ais_seconds']:.0f} s |"
            )
        lines.append("")
    if bdmc:
        lines += [
            "BDMC on images simulated from each model (mean over images; gap = upper − lower):",
            "",
            "| model | images | chains | T | lower bound | upper bound | gap | time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p, r in bdmc:
            for i, t in enumerate(r["steps"]):
                lines.append(
                    f"| {p.name} | {r.get('n', '—')} | {r.get('chains', '—')} | {t} | {r['lower'][i]:.2f} "
                    f"| {r['upper'][i]:.2f} | {r['gap'][i]:.2f} | {r['seconds'][i]:.0f} s |"
                )
        lines.append("")
        lines += [
            f"![BDMC {p.name}]({AIS_DIR}/{p.name}/{BDMC_FIGURE})"
            for p, _ in bdmc
            if (p / BDMC_FIGURE).exists()
        ]
        lines.append("")
    return lines


def plot_toy(result: dict, path: Path) -> None:
    """The bias log E[X] - E[log mean of k draws] against k (log-log)."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    k = result["k"]
    left.plot(k, result["expected_log_mean"], label="E[log((X_1+…+X_k)/k)]")
    left.axhline(result["log_expected"], color="k", ls="--", label="log E[X]")
    left.set_xscale("log")
    left.set_xlabel("k")
    left.legend()
    right.loglog(k, result["bias"], marker=".", ms=3)
    right.set_xlabel("k")
    right.set_ylabel("log E[X] − E[log mean]")
    right.set_title("bias of the k-sample bound shrinks monotonically")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(
        f"X uniform on {{{result['a']:g}, {result['b']:g}}} (exact, by enumerating the binomial)"
    )
    _save(fig, path)


def save_snr_plot(curves: list[dict], path: str | Path) -> None:
    """Plot gradient SNR against K on log-log axes, atomically as PNG: one colour per
    estimator, the encoder solid and the decoder dashed, from
    :func:`iwae.evaluate.gradient_snr_curve` results."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for i, c in enumerate(curves):
        colour = f"C{i}"
        for net, style in (("encoder", "-o"), ("decoder", "--s")):
            slope = c.get(f"{net}_slope")
            label = f"{c['estimator']} {net}" + (
                f" (slope {slope:+.2f})" if slope is not None else ""
            )
            ax.plot(c["k"], c[net], style, color=colour, label=label, markersize=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel("mean gradient SNR")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, Path(path))


def save_bdmc_plot(result: dict, path: str | Path) -> None:
    """The BDMC sandwich of :func:`iwae.ais.bdmc`, atomically as PNG: left, the mean
    forward-AIS lower bound and the mean reverse-AIS upper bound on log p(x) against the
    number of annealing steps T (log x-axis); right, their gap (upper − lower) against T,
    log–log where it is positive. (The standard errors over images, in ``bdmc.json``, measure
    the spread of log p(x) between images, not the gap's noise, so they are not drawn.)"""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    t = result["steps"]
    left.plot(
        t,
        result["upper"],
        "-v",
        color="tab:red",
        label="upper bound (reverse AIS from the exact latents)",
    )
    left.plot(t, result["lower"], "-^", color="tab:blue", label="lower bound (forward AIS)")
    left.set_xscale("log")
    left.set_xlabel("annealing steps T")
    left.set_ylabel("mean log p(x) over the simulated images (nats)")
    left.legend(fontsize=8)
    right.plot(t, result["gap"], "-o", color="tab:purple")
    if all(g is not None and g > 0 for g in result["gap"]):
        right.set_yscale("log")
    right.set_xscale("log")
    right.set_xlabel("annealing steps T")
    right.set_ylabel("gap: upper − lower (nats)")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    n = result.get("n")
    fig.suptitle(
        f"BDMC{f' on {n} images simulated from the model' if n else ''}: "
        f"gap {result['gap'][-1]:.3g} nats at T={t[-1]}"
    )
    fig.tight_layout()
    _save(fig, Path(path))
