"""The papers' statements checked on our runs: the margin b − a between two models with its
paired standard error over common test images (:func:`paired_margin`; of any two per-image
tables, :func:`paired_images`), a verdict that needs two standard errors
(:func:`claim_verdict`), and the claims of each experiment as report lines
(:func:`table1_claims`, :func:`two_stage_claims`, :func:`variants_claims`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from itertools import pairwise

import numpy as np

from iwae.experiments import VARIANTS
from iwae.report.cells import units_text
from iwae.report.results import RunResult, images_kind, mean_of, per_image_values

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


def _cell_images(runs: list[RunResult], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(test_index, values)``: per-image ``key`` averaged over ``runs`` (the seeds of one
    cell) on the test images they all share; None if a run has no per-image values."""
    tables = [per_image_values(r) for r in runs]
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


def paired_images(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> Margin | None:
    """b − a over the test images both were evaluated on: ``a`` and ``b`` are (test index,
    per-image value); the mean of the per-image differences with its paired standard error
    (std / sqrt(n)), in float64; None where they share fewer than two images."""
    common, ia, ib = np.intersect1d(a[0], b[0], assume_unique=True, return_indices=True)
    if len(common) < 2:
        return None
    d = np.asarray(b[1], dtype=np.float64)[ib] - np.asarray(a[1], dtype=np.float64)[ia]
    return Margin(float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))), len(d))


def paired_margin(a: list[RunResult], b: list[RunResult], key: str) -> Margin | None:
    """b − a in ``key`` (a quantity of :data:`PER_IMAGE`): paired over the test images both
    were evaluated on where both have per-image values, else the difference of their
    evaluation means (no standard error); None when either has no evaluation."""
    if not a or not b:
        return None
    pa, pb = _cell_images(a, key), _cell_images(b, key)
    paired = paired_images(pa, pb) if pa is not None and pb is not None else None
    if paired is not None:
        return paired
    same = len({images_kind(r) for r in a + b}) == 1
    return Margin(
        mean_of([r.evaluation[key] for r in b]) - mean_of([r.evaluation[key] for r in a]),
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


def claim_line(claim: str, detail: str, pairs: list[tuple[str, Margin, int]]) -> str:
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
            images = "" if len(sizes) == 1 else f" ({m.n:,} images)"
            parts.append(f"{name} = {m.diff:+.2f} ± {m.se:.2f}{images} ({v})")
    over = f" over {sizes.pop():,} test images" if len(sizes) == 1 else ""
    return line + f"; margin ± paired standard error{over}: " + ", ".join(parts)


def table1_claims(dataset, layers, cells, units) -> list[str]:
    """Burda et al. Table 1: IWAE below the VAE in NLL at every k > 1, IWAE NLL falling
    with k (both with paired standard errors), IWAE with at least as many active units at
    every k > 1."""
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
    return mean_of([r.evaluation["nll"] for r in cells.get(key, [])])


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
    return claim_line(
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
    return claim_line(f"{dataset}, {layers} layer(s): IWAE NLL falling with k", detail, margins)


def _more_active_units(dataset, layers, units) -> str | None:
    au = [  # k > 1: at k=1 the two are one objective
        (k, units((dataset, layers, k, "iwae")), units((dataset, layers, k, "vae")))
        for k in (5, 50)
    ]
    au = [p for p in au if None not in p]
    if not au:
        return None
    ok = all(sum(i) >= sum(v) for _, i, v in au)
    detail = ", ".join(f"k={k}: {units_text(i)} vs {units_text(v)}" for k, i, v in au)
    return (
        f"- {dataset}, {layers} layer(s): IWAE with at least as many active units as VAE — "
        f"**{'holds' if ok else 'does not hold'}** ({detail}; counts of units, no standard error)"
    )


def two_stage_claims(cells, paper) -> list[str]:
    """Burda et al. sec. 5.2: IWAE after a VAE lowers the NLL and adds active units; a VAE
    after IWAE raises the NLL and removes active units."""
    out = []
    for exp, better in ((1, True), (2, False)):
        first, second = cells.get((exp, "first"), []), cells.get((exp, "second"), [])
        if not (first and second):
            continue
        ref = paper[exp]
        a, b = (
            mean_of([r.evaluation["nll"] for r in first]),
            mean_of([r.evaluation["nll"] for r in second]),
        )
        ua, ub = (
            float(np.mean([sum(r.evaluation["active_units"]) for r in runs]))
            for runs in (first, second)
        )
        then = f"{ref['first_stage']} then {ref['second_stage']}"
        claim = (
            f"{then}: the second stage {'lowers' if better else 'raises'} the NLL (paper "
            f"{ref['first_nll']:.2f} → {ref['second_nll']:.2f})"
        )
        margin = paired_margin(first, second, "nll")
        out.append(
            claim_line(
                claim, f"{a:.2f} → {b:.2f}", [("second − first", margin, -1 if better else 1)]
            )
        )
        ok = ub > ua if better else ub < ua
        out.append(
            f"- {then}: the second stage {'adds' if better else 'removes'} active units (paper "
            f"{ref['first_active_units']} → {ref['second_active_units']}) — "
            f"**{HOLDS if ok else FAILS}** ({ua:.0f} → {ub:.0f})"
        )
    return out


def variants_claims(cells) -> list[str]:
    """Rainforth et al. 2018, Table 1: PIWAE, MIWAE and CIWAE beat IWAE in IWAE-64; every
    other method has a better inference network (higher -KL(Q||P)) than IWAE; the VAE has
    the worst generative model (lowest log p-hat(x)). ``cells``: runs by ``(method,)``."""
    methods = [m for m, _, _ in VARIANTS]
    lines = (
        _against_others(
            cells,
            "PIWAE, MIWAE and CIWAE above IWAE in IWAE-64 (paper: −85.60 to −86.08 vs −86.11)",
            ("iwae64", "IWAE", [m for m in methods if m not in ("IWAE", "VAE")]),
            others_above=True,
        ),
        _against_others(
            cells,
            "every other method above IWAE in −KL(Q‖P), a better inference network (paper: "
            "−0.47 to −1.34 vs −1.59)",
            ("neg_kl_q_p", "IWAE", [m for m in methods if m != "IWAE"]),
            others_above=True,
        ),
        _against_others(
            cells,
            "the VAE lowest in log p̂(x), the worst generative model (paper: −86.21 vs −84.40 "
            "to −85.24)",
            ("log_px", "VAE", [m for m in methods if m != "VAE"]),
            others_above=False,
        ),
    )
    return [line for line in lines if line]


def _against_others(
    cells, claim: str, compared: tuple[str, str, list[str]], others_above: bool
) -> str | None:
    """The claim that in quantity ``key`` the method ``base`` lies below (``others_above``)
    or above every method of ``others``, ``compared`` = ``(key, base, others)``: the means,
    and each pair's paired margin other − base (or base − other, expected below zero); None
    without finished runs of ``base`` or of any other."""
    key, base, others = compared

    def runs(method):
        return cells.get((method,), [])

    def value(method):
        return mean_of([r.evaluation[key] for r in runs(method)]) if runs(method) else None

    ours = value(base)
    pairs = [(m, v) for m in others if (v := value(m)) is not None]
    if ours is None or not pairs:
        return None
    detail = f"{base} {ours:.2f}; " + ", ".join(f"{m} {v:.2f}" for m, v in pairs)
    if others_above:
        margins = [(f"{m} − {base}", paired_margin(runs(base), runs(m), key), 1) for m, _ in pairs]
    else:
        margins = [(f"{base} − {m}", paired_margin(runs(m), runs(base), key), -1) for m, _ in pairs]
    return claim_line(claim, detail, margins)
