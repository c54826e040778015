"""The report's sections: one Markdown table per experiment beside the papers' numbers, with
its claims and figures (:data:`SECTIONS`, keyed by the names of
:data:`iwae.experiments.EXPERIMENTS`), and the section on AIS and BDMC."""

from __future__ import annotations

from pathlib import Path

from iwae.experiments import EXPERIMENTS, VARIANTS
from iwae.report.cells import (
    budget_line,
    fmt,
    image_notes,
    marked_cell,
    mean_units,
    units_text,
    value_cell,
)
from iwae.report.claims import (
    paired_margin,
    table1_claims,
    two_stage_claims,
    variants_claims,
)
from iwae.report.plots import section_figures
from iwae.report.results import (
    RunResult,
    group_runs,
    paper_table1,
    paper_tables,
    read_json_or_none,
    share_k1,
    table_rows,
)
from iwae.rundir import AIS_FILE, BDMC_FIGURE, BDMC_FILE


def _title(name: str) -> str:
    return f"## {EXPERIMENTS[name].title}"


def _claims(results: list[RunResult], heading: str, claims: list[str]) -> list[str]:
    """The footnotes of a table's marks, then ``heading`` over the lines of ``claims``."""
    notes = image_notes(results)
    lines = ([""] + notes if notes else []) + ["", heading, ""]
    return lines + (claims or ["- not enough finished runs yet"]) + [""]


def _table1_section(meta, results, fig_dir: Path) -> list[str]:
    """Burda et al. Table 1: NLL and active units of each cell beside the paper's, then
    the paper's orderings (:func:`iwae.report.claims.table1_claims`) and the figures."""
    paper, trained = paper_table1(), group_runs(results, ("dataset", "layers", "k", "objective"))
    cells = share_k1(trained)

    def units(key):
        return mean_units(cells.get(key, []))

    datasets = ", ".join(
        d.upper() for d in ("mnist", "omniglot") if d in {r.label["dataset"] for r in results}
    )
    budgets = f", {meta['passes_per_run']:,} passes" if meta.get("_several_budgets") else ""
    lines = [
        f"{_title('table1')} ({datasets}){budgets}",
        "",
        budget_line(meta, results),
        "",
        "| dataset | layers | k | VAE NLL | paper | Δ | IWAE NLL | paper | Δ | VAE units | paper "
        "| IWAE units | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    claims = []
    in_grid = {(r.label["dataset"], r.label["layers"]) for r in results}
    for dataset, layers in [(d, n) for d in ("mnist", "omniglot") for n in (1, 2)]:
        if (dataset, layers) in in_grid:
            lines += [_table1_row(paper, (dataset, layers, k), cells, units) for k in (1, 5, 50)]
            claims += table1_claims(dataset, layers, cells, units)
    if any(cells[key] and key not in trained for key in cells):
        lines += [
            "",
            "k=1: VAE and IWAE are one objective (the one-sample ELBO); where a grid trained "
            "one of them, both columns show its runs.",
        ]
    lines += _claims(results, "Orderings of the paper, at this budget:", claims)
    return lines + section_figures(meta, results, fig_dir, "table1")


def _table1_row(paper: dict, row_key: tuple, cells: dict, units) -> str:
    """One row of Table 1, ``row_key`` = (dataset, layers, k): NLL (ours, the paper's, the
    difference) of the VAE and IWAE, then their active units beside the paper's."""
    dataset, layers, k = row_key
    row = [dataset, str(layers), str(k)]
    for obj in ("vae", "iwae"):
        text, ours = value_cell(cells.get((dataset, layers, k, obj), []), "nll")
        ref = paper[(dataset, layers, k, obj)]["nll"]
        row += [text, fmt(ref), fmt(None if ours is None else ours - ref)]
    for obj in ("vae", "iwae"):
        row += [
            units_text(units((dataset, layers, k, obj))),
            paper[(dataset, layers, k, obj)]["active_units"],
        ]
    return "| " + " | ".join(row) + " |"


def _two_stage_section(meta, results, fig_dir: Path) -> list[str]:
    """Burda et al. section 5.2: NLL and active units after each stage beside the paper's,
    then what the paper shows (:func:`iwae.report.claims.two_stage_claims`) and the figures."""
    paper = {r["experiment"]: r for r in table_rows(paper_tables()["burda2016_two_stage"])}
    cells = group_runs(results, ("experiment", "stage"))
    lines = [
        _title("two-stage"),
        "",
        budget_line(meta, results),
        f"The second stage runs {3 ** (meta['stages'] - 1)} passes at learning rate 1e-4 "
        "(the paper: 3^7 = 2,187).",
        "",
        "| experiment | first stage | NLL | paper | units | paper | second stage | NLL | paper "
        "| units | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for exp in (1, 2):
        ref, row = paper[exp], [str(exp)]
        for stage in ("first", "second"):
            runs = cells.get((exp, stage), [])
            row += [
                ref[f"{stage}_stage"],
                value_cell(runs, "nll")[0],
                fmt(ref[f"{stage}_nll"]),
                units_text(mean_units(runs)),
                str(ref[f"{stage}_active_units"]),
            ]
        lines.append("| " + " | ".join(row) + " |")
    claims = two_stage_claims(cells, paper)
    lines += _claims(results, "What the paper shows, at this budget:", claims)
    return lines + section_figures(meta, results, fig_dir, "two-stage")


def _variants_section(meta, results, fig_dir: Path) -> list[str]:
    """Rainforth et al. 2018: IWAE-64, log p-hat(x) and -KL(Q||P) of each method (mean ±
    standard deviation over seeds) beside the paper's, then what the paper shows
    (:func:`iwae.report.claims.variants_claims`) and the figures."""
    paper = {r["method"]: r for r in table_rows(paper_tables()["rainforth2018_variants"])}
    cells = group_runs(results, ("method",))
    lines = [
        _title("variants"),
        "",
        budget_line(meta, results) + " Mean ± standard deviation over seeds.",
        "",
        "| method | IWAE-64 | paper | log p̂(x) | paper | −KL(Q‖P) | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, paper_key, _ in VARIANTS:
        runs, ref, row = cells.get((method,), []), paper[paper_key], [method]
        for key in ("iwae64", "log_px", "neg_kl_q_p"):
            row += [
                value_cell(runs, key, spread=True)[0],
                f"{ref[key]:.2f} ± {ref[key + '_std']:.2f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    claims = variants_claims(cells)
    lines += _claims(results, "What the paper shows, at this budget (means over seeds):", claims)
    return lines + section_figures(meta, results, fig_dir, "variants")


def _dreg_section(meta, results, fig_dir: Path) -> list[str]:
    """Beyond the papers: NLL, IWAE-64 and active units with the standard and the DReG
    encoder gradient, and their paired NLL difference (:func:`_dreg_row`); the figures."""
    cells = group_runs(results, ("layers", "k", "estimator"))
    lines = [
        _title("dreg"),
        "",
        budget_line(meta, results),
        "",
        "| layers | k | NLL, standard | NLL, DReG | DReG − standard | IWAE-64, standard "
        "| IWAE-64, DReG | units, standard | units, DReG |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layers in (1, 2):
        for k in (5, 50):
            std, dr = cells.get((layers, k, "reparam"), []), cells.get((layers, k, "dreg"), [])
            if std or dr:
                lines.append(_dreg_row(layers, k, std, dr))
    notes = image_notes(results, hidden=False)
    lines += ([""] + notes if notes else []) + [
        "",
        "A negative difference means DReG reached a lower (better) test NLL at the same budget; "
        "± its paired standard error over the test images both were evaluated on (where "
        "per-image values exist).",
        "",
    ]
    return lines + section_figures(meta, results, fig_dir, "dreg")


def _dreg_row(layers, k, std: list[RunResult], dr: list[RunResult]) -> str:
    """One row of the DReG table: NLL, their paired difference, IWAE-64 and units of each."""
    diff = paired_margin(std, dr, "nll")
    diff = (
        "—" if diff is None else fmt(diff.diff) + ("" if diff.se is None else f" ± {diff.se:.2f}")
    )
    units = [units_text(runs[0].evaluation["active_units"]) if runs else "—" for runs in (std, dr)]
    cells = [
        marked_cell(std, "nll"),
        marked_cell(dr, "nll"),
        diff,
        marked_cell(std, "iwae64"),
        marked_cell(dr, "iwae64"),
        *units,
    ]
    return f"| {layers} | {k} | " + " | ".join(cells) + " |"


#: the section of each experiment of :data:`iwae.experiments.EXPERIMENTS`, by its name:
#: ``(experiment.json's content, its runs, the figures' directory) -> Markdown lines``
SECTIONS = {
    "table1": _table1_section,
    "two-stage": _two_stage_section,
    "variants": _variants_section,
    "dreg": _dreg_section,
}

#: the directory of AIS and BDMC results in a report's directory
AIS_DIR = "ais"


def ais_section(directory: Path) -> list[str]:
    """The section on log p(x) beyond L_5000, from ``directory/ais/*/ais.json`` (``iwae
    evaluate --method ais --out``) and ``directory/ais/*/bdmc.json`` (``iwae bdmc --out``,
    with its figure ``bdmc.png``); no lines where there are none."""
    runs = sorted(p for p in (Path(directory) / AIS_DIR).glob("*") if p.is_dir())
    ais = [(p.name, read_json_or_none(p / AIS_FILE)) for p in runs]
    ais = [(name, r) for name, r in ais if isinstance(r, dict) and "log_px_ais" in r]
    bdmc = [(p, read_json_or_none(p / BDMC_FILE)) for p in runs]
    bdmc = [(p, r) for p, r in bdmc if isinstance(r, dict) and "lower" in r]
    if not ais and not bdmc:
        return []
    lines = [
        "## log p(x) beyond L_5000: annealed importance sampling and BDMC",
        "",
        "AIS (`iwae evaluate --method ais`) is a stochastic lower bound on log p(x), like L_5000 "
        "but tighter as the annealing steps T grow; its gap to L_5000 is measured on the same "
        "test images (paired standard error). BDMC (`iwae bdmc`) brackets log p(x) of images "
        "simulated from the model between forward AIS (lower) and reverse AIS from the exact "
        "latents (upper).",
        "",
    ]
    return lines + (_ais_table(ais) if ais else []) + (_bdmc_table(bdmc) if bdmc else [])


def _ais_table(ais: list[tuple[str, dict]]) -> list[str]:
    """One row per model (name, ``ais.json``): AIS's settings, L_5000, log p(x) by AIS and
    the gap, each ± its standard error."""
    lines = [
        "| model | test images | T | chains | leapfrog | from | HMC acceptance | L_5000 "
        "| log p(x) by AIS | AIS − L_5000 | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in ais:
        lines.append(
            f"| {name} | {r['n_test']:,} | {r['ais_steps']} | {r['chains']} "
            f"| {r['hmc_leapfrog']} | {r['ais_init']} | {fmt(r.get('ais_acceptance'))} "
            f"| {r['log_px_iwae']:.2f} | {r['log_px_ais']:.2f} ± {r['log_px_ais_stderr']:.2f} "
            f"| {r['ais_gap']:+.2f} ± {r['ais_gap_stderr']:.2f} | {r['ais_seconds']:.0f} s |"
        )
    return lines + [""]


def _bdmc_table(bdmc: list[tuple[Path, dict]]) -> list[str]:
    """One row per model (directory, ``bdmc.json``) and number of annealing steps: the BDMC
    bounds and their gap; then the figures found."""
    lines = [
        "BDMC on images simulated from each model (mean over images; gap = upper − lower):",
        "",
        "| model | images | chains | T | lower bound | upper bound | gap | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p, r in bdmc:
        for i, t in enumerate(r["steps"]):
            lines.append(
                f"| {p.name} | {r.get('n', '—')} | {r.get('chains', '—')} | {t} "
                f"| {r['lower'][i]:.2f} | {r['upper'][i]:.2f} | {r['gap'][i]:.2f} "
                f"| {r['seconds'][i]:.0f} s |"
            )
    lines.append("")
    lines += [
        f"![BDMC {p.name}]({AIS_DIR}/{p.name}/{BDMC_FIGURE})"
        for p, _ in bdmc
        if (p / BDMC_FIGURE).exists()
    ]
    return lines + [""]
