"""The figures: the report's (learning curves as small multiples, unit activity, samples,
the budget ladder) and those of single commands (image grids, the toy's bias, gradient
SNR, the BDMC sandwich). Each is written as a PNG atomically; matplotlib is imported when
a figure is drawn."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iwae.data import atomic_write, tile_images
from iwae.errors import IwaeError
from iwae.report.cells import units_text
from iwae.report.results import FIRST, RunResult, images_kind, stage_results
from iwae.rundir import WEIGHTS_FILE
from iwae.runs import load_run


# matplotlib is imported inside the functions that draw: importing it (pyplot: about a second)
# at the top would slow down every command of the CLI, which imports this module.
def _plt():
    """matplotlib's pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Save ``fig`` as a PNG at ``path`` atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def save_image_grid(
    images: np.ndarray, path: str | Path, side: int = 28, cols: int | None = None, shape=None
) -> None:
    """Save images (pixel values in [0, 1], ink = 1) as a PNG grid, black ink on white,
    atomically; tiles of the image shape ``shape`` (see :func:`iwae.data.tile_images`), else
    side x side."""
    plt = _plt()
    grid = tile_images(images, side, cols, shape=shape)
    atomic_write(
        Path(path),
        lambda f: plt.imsave(f, 1.0 - grid, cmap="gray", vmin=0.0, vmax=1.0, format="png"),
    )


def section_figures(meta, results, fig_dir: Path, exp: str) -> list[str]:
    """A section's figures, drawn into ``fig_dir``: learning curves, unit activity and
    samples of each finished run, named after ``meta["_figure_prefix"]`` (else ``exp``); the
    Markdown lines that show them."""
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


K_COLOURS = {1: "tab:blue", 5: "tab:orange", 50: "tab:green"}


OBJECTIVE_STYLES = {"vae": "--", "iwae": "-"}


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

    look = _Look.of(results)
    panels = sorted({_panel(r) for r in results}, key=str)
    single = len(panels) == 1  # one panel per bound, side by side
    shape = (1, len(keys)) if single else (len(keys), len(panels))
    fig, axes = plt.subplots(*shape, figsize=(4.8 * shape[1], 3.4 * shape[0]), squeeze=False)
    for row, (key, title) in enumerate(keys):
        for col, panel in enumerate(panels):
            ax = axes[0][row] if single else axes[row][col]
            for line in look.lines:
                runs = [r for r in results if _panel(r) == panel and look.line_of(r) == line]
                xs, ys = _mean_curve(runs, key)
                if xs:
                    ax.plot(xs, ys, **look.options(line))
            _axes_of_curves(ax)
            if single or row == 0:
                ax.set_title(_panel_title(panel))
            if single or row == len(keys) - 1:
                ax.set_xlabel("passes over the training set")
            if single or col == 0:
                ax.set_ylabel(f"{title} (nats, test subset)")
    handles = [Line2D([], [], **look.options(line)) for line in look.lines]
    axes[0][-1].legend(
        handles=handles, fontsize=7, handlelength=3, loc="upper left", bbox_to_anchor=(1.02, 1.0)
    )
    fig.tight_layout()
    return fig


def _axes_of_curves(ax) -> None:
    """Passes on a log scale, labelled 1, 4, 13, ...; a grid."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.grid(alpha=0.3, which="both")


@dataclass(frozen=True)
class _Look:
    """How :func:`curves_figure` tells its lines apart: ``lines``, each ``(colour value,
    style value)`` (:func:`_curve_line`) in legend order, drawn in ``colours`` and
    ``styles`` of those values; ``style_key`` and ``colour_keys``: :func:`_curve_keys`."""

    style_key: str | None
    colour_keys: tuple[str, ...]
    lines: list[tuple]
    colours: dict
    styles: dict

    @classmethod
    def of(cls, results: list[RunResult]) -> _Look:
        style_key, colour_keys = _curve_keys(results)
        order = _style_order(style_key)
        lines = sorted(
            {_curve_line(r, style_key, colour_keys) for r in results},
            key=lambda l: (_value_order(l[0]), order(l[1])),
        )
        colours = sorted({colour for colour, _ in lines}, key=_value_order)
        styles = sorted({style for _, style in lines}, key=order)
        return cls(
            style_key,
            colour_keys,
            lines,
            _curve_colours(colours, colour_keys),
            _curve_styles(styles, style_key),
        )

    def line_of(self, r: RunResult) -> tuple:
        return _curve_line(r, self.style_key, self.colour_keys)

    def options(self, line: tuple) -> dict:
        """matplotlib's options for ``line``, with its legend label."""
        colour, style = line
        return dict(
            color=self.colours[colour],
            ls=self.styles[style],
            marker="o",
            ms=3,
            label=_line_label(colour, style, self.colour_keys, self.style_key),
        )


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
    """Sort key of style values: those of :data:`LINE_STYLES` in its order (VAE before IWAE),
    then the rest."""
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
    """Each run's sorted unit activities per layer (log scale) against the 0.01 threshold."""
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
        ax.set_title(f"{r.name}\nactive {units_text(r.evaluation['active_units'])}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("sorted unit activity Cov_x(E_q[u]) (log scale; dashed: 0.01)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save_samples(r: RunResult, meta, fig_dir: Path, name: str) -> bool:
    """Draw 64 samples of run ``r`` into ``fig_dir/samples/name`` unless drawn from its
    current weights already; False where its model cannot be loaded."""
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


PAPER_PASSES = 3280


STAGE_ENDS = [sum(3**j for j in range(i + 1)) for i in range(8)]  # 1, 4, 13, ..., 3,280


def _ladder_curve(r: RunResult) -> list[tuple[int, float]]:
    """A run's stage-end ``test_nll_subset`` against passes."""
    return [
        (r.offset + m["pass"], m["test_nll_subset"]) for m in r.metrics if "test_nll_subset" in m
    ]


def _final_point(r: RunResult) -> tuple[int, float] | None:
    """A run's final evaluation at its budget, unless made on the first test images."""
    if r.evaluation is None or r.passes is None or images_kind(r)[0] == FIRST:
        return None
    return r.passes, r.evaluation["nll"]


def plot_ladder(
    dataset: str, runs: list[RunResult], paper: dict, path: Path, second: dict | None = None
) -> None:
    """Test NLL against passes (log scale), one panel per number of stochastic layers:
    colour by k, dashed VAE and solid IWAE; circles the stage-end subset values, squares
    the final evaluations (open squares: stage ends evaluated while the run trained), stars
    the paper's values at 3,280 passes, crosses the independent reproduction's
    (``second``: NLL by (dataset, layers, k, objective)) there."""
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
            other = (second or {}).get((dataset, n_layers, k, objective))
            if other is not None:
                ax.plot(
                    [PAPER_PASSES * 1.12], [other], marker="X", ms=8, color=K_COLOURS.get(k, "k")
                )
        ax.set_xscale("log")
        ax.set_xticks(STAGE_ENDS, [f"{p:,}" for p in STAGE_ENDS])
        ax.set_xlabel("passes over the training set (stage ends)")
        ax.set_title(f"{dataset.upper()}, {n_layers} stochastic layer{'s' if n_layers > 1 else ''}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("test NLL (nats)")
    axes[0][-1].legend(
        handles=_ladder_legend(bool(second)),
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
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
    for stage in filter(None, map(_final_point, stage_results(r))):
        ax.plot([stage[0]], [stage[1]], marker="s", ms=6, color=colour, mfc="none", ls="none")


def _ladder_legend(second: bool = False) -> list:
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
            marker="s",
            ms=6,
            mfc="none",
            ls="none",
            label="stage end, evaluated in training",
        ),
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
    if second:
        handles.append(
            Line2D(
                [], [], color="gray", marker="X", ms=8, ls="none", label="nbip/IWAE, 3,280 passes"
            )
        )
    return handles


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
