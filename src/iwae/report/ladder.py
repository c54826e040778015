"""Table 1 across budgets, the budget ladder: every Table 1 cell's test NLL after each
training budget found in the table1 experiment directories (final evaluations, else
stage-end values), beside the paper's after 3,280 passes and, where there is one, an
independent reproduction's at the same budget (:func:`~iwae.report.results.independent_table1`)."""

from __future__ import annotations

from pathlib import Path

from iwae.experiments import EXPERIMENTS
from iwae.report.cells import STAGE_END_MARK, STAGE_EVALUATION_MARK, fmt, image_notes, value_cell
from iwae.report.plots import plot_ladder
from iwae.report.results import (
    RunResult,
    independent_reproductions,
    independent_table1,
    mean_of,
    paper_table1,
    share_k1,
    stage_results,
)


def ladder_sections(experiments: list[tuple[dict, list[RunResult]]], fig_dir: Path) -> list[str]:
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
    distance to it from the largest budget with a number, then the same for the independent
    reproduction where it has the dataset; then the notes and the figure."""
    paper, budgets = paper_table1(), _ladder_budgets(runs)
    second = {key: v for key, v in independent_table1().items() if key[0] == dataset}
    cells: dict[tuple, list[RunResult]] = {}
    for r in runs:
        cells.setdefault((r.label["layers"], r.label["k"], r.label["objective"]), []).append(r)
    cells = share_k1(cells)
    order = sorted(cells, key=lambda c: (c[0], c[1], c[2] != "vae"))
    sources = sorted(
        {(r.passes or 0, r.run_dir.parent.parent.name) for r in runs if r.run_dir is not None}
    )
    lines = [
        f"## {EXPERIMENTS['table1'].title} across budgets ({dataset.upper()}): the budget ladder",
        "",
        (
            "Test NLL (nats) of each cell after each training budget found, in passes over the "
            "training set (the paper: 3,280), from "
            f"{', '.join(f'`{name}/` ({p:,} passes)' for p, name in sources)}."
        ),
        "",
        "| layers | k | objective | "
        + " | ".join(f"{b:,} passes" for b in budgets)
        + " | paper (3,280 passes) | Δ to the paper |"
        + (" nbip/IWAE (3,280 passes) | Δ to nbip/IWAE |" if second else ""),
        "|---|---|---|" + "---|" * len(budgets) + "---|---|" + ("---|---|" if second else ""),
    ]
    lines += [_ladder_row(dataset, cell, cells[cell], budgets, paper, second) for cell in order]
    lines += [""] + _ladder_notes(runs, budgets, bool(second)) + [""]
    fig_dir.mkdir(parents=True, exist_ok=True)
    name = f"table1-ladder-{dataset}.png"
    plot_ladder(dataset, runs, paper, fig_dir / name, second)
    return lines + [f"![test NLL against passes, {dataset.upper()}]({fig_dir.name}/{name})", ""]


def _ladder_budgets(runs: list[RunResult]) -> list[int]:
    """The ladder's columns: every experiment's passes per run, and every stage end (with a
    logged ``test_nll_subset`` or a stage evaluation) from the smallest of those on."""
    finals = {r.passes for r in runs if r.passes}
    ends = {m["pass"] for r in runs for m in r.metrics if "test_nll_subset" in m}
    ends |= {p for r in runs for p in r.stages}
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
    passes (:func:`value_cell`), else the evaluations of their weights after ``budget``
    passes made while they trained (marked ¶), else the mean stage-end
    ``test_nll_subset`` logged at that pass (marked §); with the value put beside the
    paper's, or None."""
    text, value = value_cell(
        [r for r in runs if r.passes == budget and r.evaluation is not None], "nll"
    )
    staged = [s for r in runs for s in stage_results(r) if s.passes == budget]
    if value is None and (found := value_cell(staged, "nll"))[1] is not None:
        return found[0] + STAGE_EVALUATION_MARK, found[1]
    if value is None and (subset := _stage_end_values(runs, budget)):
        return fmt(mean_of(subset)) + STAGE_END_MARK, mean_of(subset)
    return text, value


def _ladder_row(dataset, cell, runs, budgets, paper, second: dict) -> str:
    """One cell's row; with ``second`` (the independent reproduction's NLL by cell) two
    more columns: its value and our latest number's distance to it."""
    layers, k, objective = cell
    points = [_ladder_point(runs, b) for b in budgets]
    found = [(b, v) for b, (_, v) in zip(budgets, points) if v is not None]

    def delta(ref: float | None) -> str:
        if ref is None or not found:
            return "—"
        return f"{found[-1][1] - ref:+.2f} at {found[-1][0]:,} passes"

    ref = paper[(dataset, layers, k, objective)]["nll"]
    cells = [str(layers), str(k), objective.upper(), *(t for t, _ in points), fmt(ref), delta(ref)]
    if second:
        other = second.get((dataset, layers, k, objective))
        cells += [fmt(other) if other is not None else "—", delta(other)]
    return "| " + " | ".join(cells) + " |"


def _ladder_notes(runs: list[RunResult], budgets: list[int], second: bool) -> list[str]:
    """What the ladder's plain numbers, marks and references mean."""
    notes = [
        "Plain numbers: the final evaluation (−L_5000 on the whole test set, `evaluation.json`), "
        "the mean over seeds where there are several."
    ]
    finals = [r for r in runs if r.evaluation is not None and r.passes in budgets]
    staged = [s for r in runs for s in stage_results(r) if s.passes in budgets]
    notes += image_notes(finals + staged)
    if staged:
        notes.append(
            f"{STAGE_EVALUATION_MARK} the weights at the end of that training stage, evaluated "
            "as the final evaluations are while the run trained on (`iwae evaluate` of the "
            "unfinished run: `stages/PASSES/evaluation.json` in its directory)."
        )
    stage_ends = {
        (m.get("test_nll_subset_k"), m.get("test_nll_subset_n"))
        for r in runs
        for m in r.metrics
        if "test_nll_subset" in m and m["pass"] in budgets
    }
    for k, n in sorted(stage_ends, key=str):
        notes.append(
            f"{STAGE_END_MARK} no final evaluation at this budget (yet): −L_{k} at the end of the "
            f"training stage on a seeded random subset of {n:,} test images (`test_nll_subset` in "
            "`metrics.jsonl`)."
        )
    if any(r.label["k"] == 1 for r in runs):
        notes.append(
            "k=1: VAE and IWAE are one objective (the one-sample ELBO), so both rows show the "
            "runs of either."
        )
    notes.append("Δ: our latest number minus the paper's (after 3,280 passes).")
    if second:
        notes.append(
            "nbip/IWAE: an independent reproduction of Table 1 at the paper's budget, as a "
            f"second reference ({independent_reproductions()['source']}); Δ to nbip/IWAE: "
            "our latest number minus its."
        )
    return [n + "  " for n in notes[:-1]] + notes[-1:]
