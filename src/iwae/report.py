"""Figures and the reproduction report: our numbers beside the papers', with plots."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iwae.data import atomic_write


def tile_images(images: np.ndarray, side: int = 28, cols: int | None = None, pad: int = 1) -> np.ndarray:
    """Arrange ``images`` [n, side*side] in a grid with ``pad`` pixels of border."""
    images = np.asarray(images, dtype=np.float32).reshape(-1, side, side)
    n = images.shape[0]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (side + pad) + pad, cols * (side + pad) + pad), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (side + pad), pad + c * (side + pad)
        grid[y : y + side, x : x + side] = img
    return grid


def save_image_grid(images: np.ndarray, path: str | Path, side: int = 28, cols: int | None = None) -> None:
    """Save images (pixel values in [0, 1], ink = 1) as a PNG grid, black ink on white, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = tile_images(images, side, cols)
    atomic_write(Path(path), lambda f: plt.imsave(f, 1.0 - grid, cmap="gray", vmin=0.0, vmax=1.0, format="png"))


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
    after: "RunResult | None" = None  # the run it continues


def load_experiment(exp_dir: Path) -> tuple[dict, list[RunResult]]:
    from iwae.train import read_metrics

    meta = _read_json(exp_dir / "experiment.json")
    results = []
    for run in meta["runs"]:
        d = exp_dir / "runs" / run["name"]
        activity = _read_json(d / "activity.json")
        results.append(RunResult(
            run["name"], run["label"], run["config"], _read_json(d / "evaluation.json"),
            activity and activity["unit_activity"], _read_json(d / "runner.json"), read_metrics(d),
            _read_json(d / "summary.json"),
        ))  # fmt: skip
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


def _budget(meta: dict, results: list[RunResult]) -> str:
    done = sum(r.evaluation is not None for r in results)
    walls = [r.runner["train_wall_s"] + r.runner["eval_wall_s"] for r in results if r.runner]
    text = (
        f"Budget: `--stages {meta['stages']}` ({meta['passes_per_run']} passes per run; the paper: 8 stages, "
        f"3,280 passes), {meta['seeds']} seed(s); NLL = −L_{meta['eval_k']} on "
        f"{'the full test set' if meta.get('n_test') is None else 'the first %d test images' % meta['n_test']}. "
        f"{done} of {len(results)} runs finished"
    )
    filters = meta.get("only")
    if filters:  # only part of the grid was asked for
        from iwae.experiments import grid

        total = len(grid(meta["experiment"], meta["stages"], meta["seeds"]))
        if total > len(results):
            text += f" (selected with --only: {len(results)} of the grid's {total} runs)"
    if walls:
        text += f", {sum(walls) / 3600:.1f} CPU-process hours in all (train + evaluate)"
    if meta.get("overrides"):
        text += f". Every run with {json.dumps(meta['overrides'])}"
    return text + "."


def _group(results, keys):
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        if r.evaluation is not None:
            groups.setdefault(tuple(r.label[k] for k in keys), []).append(r)
    return groups


def _table1_section(meta, results, fig_dir: Path) -> list[str]:
    paper = {(r["dataset"], r["stochastic_layers"], r["k"], r["objective"]): r for r in _rows(paper_tables()["burda2016_table1"])}
    cells = _group(results, ("dataset", "layers", "k", "objective"))

    def nll(key):
        return _mean([r.evaluation["nll"] for r in cells.get(key, [])])

    def units(key):
        runs = cells.get(key, [])
        return [float(np.mean(c)) for c in zip(*[r.evaluation["active_units"] for r in runs])] if runs else None

    datasets = {r.label["dataset"] for r in results}
    lines = [
        f"## Burda et al. (2016), Table 1 ({', '.join(d.upper() for d in ('mnist', 'omniglot') if d in datasets)})", "",
        _budget(meta, results), "",
        "| dataset | layers | k | VAE NLL | paper | Δ | IWAE NLL | paper | Δ | VAE units | paper | IWAE units | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    checks = []
    in_grid = {(r.label["dataset"], r.label["layers"]) for r in results}
    for dataset in ("mnist", "omniglot"):
        for layers in (1, 2):
            if (dataset, layers) not in in_grid:
                continue
            for k in (1, 5, 50):
                row = [dataset, str(layers), str(k)]
                for obj in ("vae", "iwae"):
                    ours, ref = nll((dataset, layers, k, obj)), paper[(dataset, layers, k, obj)]["nll"]
                    row += [_fmt(ours), _fmt(ref), _fmt(None if ours is None else ours - ref)]
                for obj in ("vae", "iwae"):
                    row += [_units(units((dataset, layers, k, obj))), paper[(dataset, layers, k, obj)]["active_units"]]
                lines.append("| " + " | ".join(row) + " |")
            checks += _table1_checks(dataset, layers, nll, units)
    lines += ["", "Orderings of the paper, at this budget:", ""] + (checks or ["- not enough finished runs yet"]) + [""]
    lines += _figures(meta, results, fig_dir, "table1")
    return lines


def _table1_checks(dataset, layers, nll, units) -> list[str]:
    out = []
    pairs = [(k, nll((dataset, layers, k, "iwae")), nll((dataset, layers, k, "vae"))) for k in (5, 50)]
    pairs = [p for p in pairs if None not in p]
    if pairs:
        ok = all(i < v for _, i, v in pairs)
        detail = ", ".join(f"k={k}: IWAE {i:.2f} vs VAE {v:.2f}" for k, i, v in pairs)
        out.append(f"- {dataset}, {layers} layer(s): IWAE below VAE in NLL for every k > 1 — "
                   f"**{'holds' if ok else 'does not hold'}** ({detail})")  # fmt: skip
    ks = [(k, nll((dataset, layers, k, "iwae"))) for k in (1, 5, 50)]
    ks = [p for p in ks if p[1] is not None]
    if len(ks) > 1:
        ok = all(b[1] < a[1] for a, b in zip(ks, ks[1:]))
        detail = ", ".join(f"k={k}: {v:.2f}" for k, v in ks)
        out.append(f"- {dataset}, {layers} layer(s): IWAE NLL falling with k — **{'holds' if ok else 'does not hold'}** ({detail})")
    au = [(k, units((dataset, layers, k, "iwae")), units((dataset, layers, k, "vae"))) for k in (1, 5, 50)]
    au = [p for p in au if None not in p]
    if au:
        ok = all(sum(i) >= sum(v) for _, i, v in au)
        detail = ", ".join(f"k={k}: {_units(i)} vs {_units(v)}" for k, i, v in au)
        out.append(f"- {dataset}, {layers} layer(s): IWAE with at least as many active units as VAE — "
                   f"**{'holds' if ok else 'does not hold'}** ({detail})")  # fmt: skip
    return out


def _two_stage_section(meta, results, fig_dir: Path) -> list[str]:
    paper = {r["experiment"]: r for r in _rows(paper_tables()["burda2016_two_stage"])}
    cells = _group(results, ("experiment", "stage"))
    lines = [
        "## Burda et al. (2016), two-stage training (MNIST, 1 layer)", "", _budget(meta, results),
        f"The second stage runs {3 ** (meta['stages'] - 1)} passes at learning rate 1e-4 (the paper: 3^7 = 2,187).", "",
        "| experiment | first stage | NLL | paper | units | paper | second stage | NLL | paper | units | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for exp in (1, 2):
        ref = paper[exp]
        row = [str(exp)]
        for stage, name_key, nll_key, au_key in (("first", "first_stage", "first_nll", "first_active_units"),
                                                 ("second", "second_stage", "second_nll", "second_active_units")):  # fmt: skip
            runs = cells.get((exp, stage), [])
            nll = _mean([r.evaluation["nll"] for r in runs])
            au = [float(np.mean(c)) for c in zip(*[r.evaluation["active_units"] for r in runs])] if runs else None
            row += [ref[name_key], _fmt(nll), _fmt(ref[nll_key]), _units(au), str(ref[au_key])]
        lines.append("| " + " | ".join(row) + " |")
    checks = _two_stage_checks(cells, paper)
    lines += ["", "What the paper shows, at this budget:", ""] + (checks or ["- not enough finished runs yet"]) + [""]
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
        a, b = _mean([r.evaluation["nll"] for r in first]), _mean([r.evaluation["nll"] for r in second])
        ua, ub = (float(np.mean([sum(r.evaluation["active_units"]) for r in runs])) for runs in (first, second))
        then = f"{ref['first_stage']} then {ref['second_stage']}"
        ok = b < a if better else b > a
        out.append(f"- {then}: the second stage {'lowers' if better else 'raises'} the NLL (paper {ref['first_nll']:.2f} → "
                   f"{ref['second_nll']:.2f}) — **{'holds' if ok else 'does not hold'}** ({a:.2f} → {b:.2f})")  # fmt: skip
        ok = ub > ua if better else ub < ua
        out.append(f"- {then}: the second stage {'adds' if better else 'removes'} active units (paper "
                   f"{ref['first_active_units']} → {ref['second_active_units']}) — **{'holds' if ok else 'does not hold'}** "
                   f"({ua:.0f} → {ub:.0f})")  # fmt: skip
    return out


def _variants_section(meta, results, fig_dir: Path) -> list[str]:
    paper = {r["method"]: r for r in _rows(paper_tables()["rainforth2018_variants"])}
    cells = _group(results, ("method",))
    lines = [
        "## Rainforth et al. (2018), IWAE variants (MNIST, 1 layer, 64 samples per example)", "",
        _budget(meta, results) + " Mean ± standard deviation over seeds.", "",
        "| method | IWAE-64 | paper | log p̂(x) | paper | −KL(Q‖P) | paper |", "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for method, paper_key, _ in _variant_names():
        runs = cells.get((method,), [])
        ref = paper[paper_key]
        row = [method]
        for key in ("iwae64", "log_px", "neg_kl_q_p"):
            values = [r.evaluation[key] for r in runs]
            mean, std = _mean(values), _std(values)
            row += [_fmt(mean) + ("" if std is None else f" ± {std:.2f}"), f"{ref[key]:.2f} ± {ref[key + '_std']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    checks = _variants_checks(cells)
    lines += ["", "What the paper shows, at this budget (means over seeds):", ""]
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

    methods = [m for m, _, _ in _variant_names()]
    out = []
    for claim, key, others in (
        ("PIWAE, MIWAE and CIWAE above IWAE in IWAE-64 (paper: −85.60 to −86.08 vs −86.11)", "iwae64",
         [m for m in methods if m not in ("IWAE", "VAE")]),
        ("every other method above IWAE in −KL(Q‖P), a better inference network (paper: −0.47 to −1.34 vs −1.59)",
         "neg_kl_q_p", [m for m in methods if m != "IWAE"]),
    ):  # fmt: skip
        base = value("IWAE", key)
        pairs = [(m, v) for m in others if (v := value(m, key)) is not None]
        if base is None or not pairs:
            continue
        ok = all(v > base for _, v in pairs)
        detail = f"IWAE {base:.2f}; " + ", ".join(f"{m} {v:.2f}" for m, v in pairs)
        out.append(f"- {claim} — **{'holds' if ok else 'does not hold'}** ({detail})")
    vae = value("VAE", "log_px")
    pairs = [(m, v) for m in methods if m != "VAE" and (v := value(m, "log_px")) is not None]
    if vae is not None and pairs:
        ok = all(vae < v for _, v in pairs)
        detail = f"VAE {vae:.2f}; " + ", ".join(f"{m} {v:.2f}" for m, v in pairs)
        out.append(f"- the VAE lowest in log p̂(x), the worst generative model (paper: −86.21 vs −84.40 to −85.24) — "
                   f"**{'holds' if ok else 'does not hold'}** ({detail})")  # fmt: skip
    return out


def _variant_names():
    from iwae.experiments import VARIANTS

    return VARIANTS


def _dreg_section(meta, results, fig_dir: Path) -> list[str]:
    cells = _group(results, ("layers", "k", "estimator"))

    def mean_of(key, field):
        return _mean([r.evaluation[field] for r in cells.get(key, [])])

    lines = [
        "## Beyond the papers: IWAE with the DReG encoder gradient (MNIST)", "", _budget(meta, results), "",
        "| layers | k | NLL, standard | NLL, DReG | DReG − standard | IWAE-64, standard | IWAE-64, DReG | "
        "units, standard | units, DReG |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for layers in (1, 2):
        for k in (5, 50):
            std, dr = mean_of((layers, k, "reparam"), "nll"), mean_of((layers, k, "dreg"), "nll")
            if std is None and dr is None:
                continue
            units = [_units(cells[(layers, k, e)][0].evaluation["active_units"]) if cells.get((layers, k, e)) else "—"
                     for e in ("reparam", "dreg")]  # fmt: skip
            diff = None if None in (std, dr) else dr - std
            lines.append(f"| {layers} | {k} | {_fmt(std)} | {_fmt(dr)} | {_fmt(diff)} | "
                         f"{_fmt(mean_of((layers, k, 'reparam'), 'iwae64'))} | {_fmt(mean_of((layers, k, 'dreg'), 'iwae64'))} | "
                         f"{units[0]} | {units[1]} |")  # fmt: skip
    lines += ["", "A negative difference means DReG reached a lower (better) test NLL at the same budget.", ""]
    lines += _figures(meta, results, fig_dir, "dreg")
    return lines


SECTIONS = {"table1": _table1_section, "two-stage": _two_stage_section, "variants": _variants_section,
            "dreg": _dreg_section}


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
    exp = meta.get("_figure_prefix", exp)  # the directory's name: two table1 directories do not collide
    if _plot_curves(finished, fig_dir / f"{exp}-curves.png"):
        lines += [f"![learning curves]({rel}/{exp}-curves.png)", ""]
    _plot_activity(finished, fig_dir / f"{exp}-activity.png")
    lines += [f"![unit activity]({rel}/{exp}-activity.png)", "",
              "Samples from each model: " + ", ".join(
                  f"[{r.name}]({rel}/samples/{exp}-{r.name}.png)" for r in finished
                  if _save_samples(r, meta, fig_dir, f"{exp}-{r.name}.png")), ""]  # fmt: skip
    return lines


def _plot_curves(results: list[RunResult], path: Path) -> bool:
    """Test bounds logged during training against passes; False if no run logged any."""
    plt = _plt()
    keys = [("test_iwae64", "test IWAE-64"), ("test_log_px", "test log p̂(x)"), ("test_neg_kl_q_p", "test −KL(Q‖P)")]
    keys = [k for k in keys if any(k[0] in m for r in results for m in r.metrics)]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4), squeeze=False)
    varying = {k for k in results[0].label if k != "seed" and len({str(r.label.get(k)) for r in results}) > 1}
    by_label: dict[str, list[RunResult]] = {}
    for r in results:
        name = r.label.get("method") or " ".join(f"{k}={v}" for k, v in r.label.items() if k in varying)
        by_label.setdefault(name, []).append(r)
    for ax, (key, title) in zip(axes[0], keys):
        for label, runs in by_label.items():
            points: dict[int, list[float]] = {}
            for r in runs:
                logged = [(r.offset + m["pass"], m[key]) for m in r.metrics if key in m]
                if r.after is not None and logged:  # a second stage: its line starts where the first ended
                    first = [(r.after.offset + m["pass"], m[key]) for m in r.after.metrics if key in m]
                    logged = first[-1:] + logged
                for x, value in logged:
                    points.setdefault(x, []).append(value)
            if points:
                xs = sorted(points)
                ax.plot(xs, [np.mean(points[x]) for x in xs], marker="o", ms=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("passes over the training set")
        ax.set_title(title + " (first test images)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(fig, path)
    return True


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
            ax.plot(np.arange(1, len(values) + 1), np.maximum(values, 1e-8), label=f"layer {layer + 1}")
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
        _, model = load_run(Path(meta["_dir"]) / "runs" / r.name)
    except IwaeError:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(model.sample_images(64, torch.Generator().manual_seed(0)).numpy(), path)
    return True


def write_report(directory: str | Path) -> Path:
    """Write ``directory/REPORT.md`` for every experiment directory in or under ``directory``."""
    from iwae.errors import IwaeError

    directory = Path(directory)
    if not directory.is_dir():
        raise IwaeError(f"{directory} does not exist")
    exp_dirs = sorted({p.parent for p in [*directory.glob("experiment.json"), *directory.glob("*/experiment.json")]})
    if not exp_dirs:
        raise IwaeError(f"no experiment.json in {directory} or its subdirectories: run `iwae reproduce` first")
    lines = ["# Reproduction report", "",
             "Generated by `iwae report` from the runs below; every number is from a run in this directory.", ""]  # fmt: skip
    fig_dir = directory / "figures"
    experiments = [(load_experiment(d), d) for d in exp_dirs]
    order = list(SECTIONS)
    experiments.sort(key=lambda e: order.index(e[0][0]["experiment"]))
    for (meta, results), exp_dir in experiments:
        meta["_dir"] = str(exp_dir)
        meta["_figure_prefix"] = exp_dir.name if exp_dir != directory else meta["experiment"]
        section = SECTIONS[meta["experiment"]](meta, results, fig_dir)
        lines += section + [f"Runs: `{exp_dir.relative_to(directory) if exp_dir != directory else '.'}/runs/`", ""]
    path = directory / REPORT_FILE
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))
    return path


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
    fig.suptitle(f"X uniform on {{{result['a']:g}, {result['b']:g}}} (exact, by enumerating the binomial)")
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
            label = f"{c['estimator']} {net}" + (f" (slope {slope:+.2f})" if slope is not None else "")
            ax.plot(c["k"], c[net], style, color=colour, label=label, markersize=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel("mean gradient SNR")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, Path(path))
