"""Cells and notes of the report's Markdown tables: numbers formatted and marked with the
test images they were made on (†: a seeded random subset; ‡: the first N, never put beside
the papers' numbers; §: a stage-end value; ¶: a stage-end evaluation of a run still
training), their footnotes, and each section's budget
line (passes, seeds, test images, process and GPU time)."""

from __future__ import annotations

import json

import numpy as np

from iwae.experiments import grid
from iwae.report.results import (
    FIRST,
    RANDOM,
    WHOLE,
    RunResult,
    gpu_training,
    images_kind,
    mean_of,
    process_seconds,
    std_of,
)

MARKS = {WHOLE: "", RANDOM: "†", FIRST: "‡"}


STAGE_END_MARK = "§"
#: an evaluation of a run's weights at a stage end, made while it trained (the budget ladder)
STAGE_EVALUATION_MARK = "¶"


def fmt(x, digits=2):
    """A number with ``digits`` decimals, or "—" for None."""
    return "—" if x is None else f"{x:.{digits}f}"


def units_text(counts):
    """Active units per layer, e.g. ``19+9``, or "—" for None."""
    return "—" if counts is None else "+".join(str(int(round(c))) for c in counts)


def mean_units(runs: list[RunResult]) -> list[float] | None:
    """Active units per stochastic layer averaged over ``runs`` (the seeds of one cell), or
    None without runs."""
    if not runs:
        return None
    return [float(np.mean(c)) for c in zip(*[r.evaluation["active_units"] for r in runs])]


def value_cell(
    runs: list[RunResult], key: str, digits: int = 2, spread: bool = False
) -> tuple[str, float | None]:
    """A table cell for the mean of ``key`` over ``runs`` (± the standard deviation over seeds
    if ``spread``), marked † for a random test subset, and "—‡" (no number) for an
    evaluation on the first test images; with the value put beside the paper's, or None."""
    if not runs:
        return "—", None
    kinds = {images_kind(r)[0] for r in runs}
    if FIRST in kinds:
        return "—" + MARKS[FIRST], None
    values = [r.evaluation[key] for r in runs]
    mean, std = mean_of(values), std_of(values)
    text = fmt(mean, digits) + ("" if not spread or std is None else f" ± {std:.{digits}f}")
    return text + (MARKS[RANDOM] if RANDOM in kinds else ""), mean


def marked_cell(runs: list[RunResult], key: str) -> str:
    """The mean of ``key`` over ``runs`` marked with the test images it was made on (†, ‡),
    for tables without the papers' numbers."""
    if not runs:
        return "—"
    kinds = {images_kind(r)[0] for r in runs}
    mark = MARKS[FIRST] if FIRST in kinds else MARKS[RANDOM] if RANDOM in kinds else ""
    return fmt(mean_of([r.evaluation[key] for r in runs])) + mark


def image_notes(results: list[RunResult], hidden: bool = True) -> list[str]:
    """Footnotes for the marks of :func:`value_cell` (``hidden``: first-N numbers left out)
    or :func:`marked_cell`, one per kind of subset found."""
    subsets = sorted(
        {
            images_kind(r)
            for r in results
            if r.evaluation is not None and images_kind(r)[0] != WHOLE
        },
        key=lambda x: (x[0], x[1] or 0, x[2] or 0),
    )
    notes = []
    for kind, n, size in subsets:
        if kind == RANDOM:
            notes.append(
                f"{MARKS[RANDOM]} evaluated on a seeded random subset of {n:,} of the {size:,} "
                "test images."
            )
        elif not hidden:
            notes.append(
                f"{MARKS[FIRST]} evaluated on the first {n:,} of the {size:,} test images (not a "
                "fair sample of the test set: re-evaluate)."
            )
        else:
            notes.append(
                f"—{MARKS[FIRST]} evaluated on the first {n:,} of the {size:,} test images: "
                "re-evaluate (a first-N subset is not a fair sample and is not put beside the "
                "paper's numbers)."
            )
    return list(dict.fromkeys(notes))


def _images_text(meta: dict, results: list[RunResult]) -> str:
    """Which test images the finished runs were evaluated on, in words."""
    counts: dict[tuple, int] = {}
    for r in results:
        if r.evaluation is not None:
            counts[images_kind(r)] = counts.get(images_kind(r), 0) + 1
    if not counts:
        n = meta.get("n_test")
        return "the whole test set" if n is None else f"a seeded random subset of {n:,} test images"
    words = {k: _kind_words(*k) for k in counts}
    if len(counts) == 1:
        return next(iter(words.values()))
    return "; ".join(f"{c} run(s) on {words[k]}" for k, c in counts.items())


def _kind_words(kind, n, size) -> str:
    """One kind of test images (:func:`iwae.report.results.evaluated_images`) in words."""
    if kind == WHOLE:
        return "the whole test set"
    if kind == RANDOM:
        return f"a seeded random subset of {n:,} of the {size:,} test images ({MARKS[RANDOM]})"
    return (
        f"the first {n:,} test images (evaluated before test subsets were random: not comparable "
        "with the paper's numbers; re-evaluate)"
    )


def budget_line(meta: dict, results: list[RunResult]) -> str:
    """The line under a section's heading: stages and passes beside the paper's, seeds, the
    test images, runs finished, process and GPU time, lost metrics and overrides."""
    done = sum(r.evaluation is not None for r in results)
    walls = [process_seconds(r) for r in results if r.runner]
    text = (
        f"Budget: `--stages {meta['stages']}` ({meta['passes_per_run']} passes per run; the "
        f"paper: 8 stages, 3,280 passes), {meta['seeds']} seed(s); NLL = −L_{meta['eval_k']} on "
        f"{_images_text(meta, results)}. {done} of {len(results)} runs finished"
    )
    filters = meta.get("only")
    if filters:  # only part of the grid was asked for
        total = len(grid(meta["experiment"], meta["stages"], meta["seeds"]))
        if total > len(results):
            text += f" (selected with --only: {len(results)} of the grid's {total} runs)"
    gpu = {
        r.name: (seconds, cpu_too)
        for r in results
        for seconds, cpu_too in [gpu_training(r)]
        if seconds
    }
    if walls:
        hours, cpu = sum(walls) / 3600, "" if gpu else "CPU-"
        text += f", {hours:.1f} {cpu}process hours in all (train + evaluate)"
    if gpu:
        names = sorted({name for seconds, _ in gpu.values() for name in seconds})
        minutes = sum(sum(seconds.values()) for seconds, _ in gpu.values()) / 60
        runs = ", ".join(
            name + (" (in part)" if cpu_too else "") for name, (_, cpu_too) in gpu.items()
        )
        text += (
            f"; trained on a GPU ({', '.join(names)}): {runs}, {minutes:.0f} GPU minutes of "
            "training in all"
        )
    lost = [r.name for r in results if r.summary and r.summary.get("recovered")]
    if lost:
        text += f"; per-pass metrics lost (`recovered` in `summary.json`): {', '.join(lost)}"
    if meta.get("overrides"):
        text += f". Every run with {json.dumps(meta['overrides'])}"
    return text + "."
