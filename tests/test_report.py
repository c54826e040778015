"""The report's budget ladder, its figure and the paired standard errors of its claims, from
hand-made experiment directories (no training): known per-image values, known verdicts."""

import json
import math
from dataclasses import asdict

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex

from iwae.experiments import EXPERIMENTS, Run, grid
from iwae.report import (
    FAILS,
    HOLDS,
    NOISE,
    SECTIONS,
    Margin,
    RunResult,
    claim_verdict,
    curves_figure,
    evaluated_images,
    load_experiment,
    paired_images,
    paired_margin,
    write_report,
)
from iwae.train import write_evaluation

MNIST_TEST = 10_000


def _experiment(path, name, runs, stages=3, **meta):
    """An experiment directory listing ``runs`` (their run directories are made by :func:`_run`)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "experiment.json").write_text(
        json.dumps(
            {
                "experiment": name,
                "stages": stages,
                "seeds": 1,
                "passes_per_run": sum(3**i for i in range(stages)),
                "eval_k": 5000,
                "n_test": None,
                "runs": [asdict(r) for r in runs],
                **meta,
            }
        )
    )


def _run(
    exp_dir,
    name,
    nll=None,
    index=None,
    images=None,
    first_n=None,
    size=MNIST_TEST,
    stage_ends=None,
    units=20,
):
    """A run directory. ``images``: per-image NLL on test images ``index`` (evaluation.json
    and evaluation.safetensors, a seeded random subset unless all ``size`` images); else
    ``nll`` alone in evaluation.json, made on the first ``first_n`` test images (an old
    evaluation: no subset keys) or on the whole set. ``stage_ends``: {pass: test_nll_subset}
    logged in metrics.jsonl."""
    d = exp_dir / "runs" / name
    d.mkdir(parents=True)
    if stage_ends:
        lines = [
            {"pass": p, "train_bound": -100.0}
            | (
                {
                    "test_nll_subset": stage_ends[p],
                    "test_nll_subset_k": 5000,
                    "test_nll_subset_n": 1000,
                }
                if p in stage_ends
                else {}
            )
            for p in range(1, max(stage_ends) + 1)
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if nll is None and images is None:
        return  # still training
    (d / "activity.json").write_text(json.dumps({"unit_activity": [[0.5] * units + [0.001] * 5]}))
    if images is not None:
        log_px = -torch.tensor(images, dtype=torch.float32)
        n = len(images)
        result = {
            "nll": float(np.mean(images)),
            "log_px": -float(np.mean(images)),
            "iwae64": -float(np.mean(images)) - 1,
            "neg_kl_q_p": -1.0,
            "active_units": [units],
            "n_test": n,
            "k": 5000,
            "test_set_size": size,
            "test_subset_seed": 0 if n < size else None,
        }
        per_image = {"log_px": log_px, "iwae64": log_px - 1, "elbo": log_px - 10}
        write_evaluation(d, result, per_image, np.asarray(index))
        return
    evaluation = {
        "nll": nll,
        "active_units": [units],
        "iwae64": -nll - 1,
        "k": 5000,
        "n_test": first_n or size,
    }
    if first_n is None:
        evaluation |= {"test_set_size": size, "test_subset_seed": None}
    (d / "evaluation.json").write_text(json.dumps(evaluation))


def _table1(dataset="mnist", layers=1, stages=3):
    return [
        r
        for r in grid("table1", stages)
        if r.label["dataset"] == dataset and r.label["layers"] == layers
    ]


def _name(objective, k, layers=1):
    return f"mnist-l{layers}-{objective}-k{k}-s0"


# per-image test NLL on images 0, 3, 5, 7 (float32-exact): the differences between models are
#   IWAE k=5 - VAE k=5     = -1, -3, -1, -3       mean -2,    SE sqrt(4/3)/2 = 0.577: holds
#   IWAE k=50 - VAE k=50   = +1, +3, +1, +3       mean +2,    SE 0.577: does not hold
#   IWAE k=5 - IWAE k=1    = -1, +0.5, -1, +0.5   mean -0.25, SE sqrt(0.75)/2 = 0.433: within noise
#   IWAE k=50 - IWAE k=5   = -2, -2, -2, -2       mean -2,    SE 0: holds
INDEX = [0, 3, 5, 7]
IMAGES = {
    ("iwae", 1): [91.0, 91.5, 95.0, 95.5],
    ("vae", 1): [91.0, 91.5, 95.0, 95.5],
    ("iwae", 5): [90.0, 92.0, 94.0, 96.0],
    ("iwae", 50): [88.0, 90.0, 92.0, 94.0],
    ("vae", 50): [87.0, 87.0, 91.0, 91.0],
}
# VAE k=5 was evaluated on a different subset, in another order: images 7, 5, 3, 0 and 9
VAE5_INDEX, VAE5_IMAGES = [7, 5, 3, 0, 9], [99.0, 95.0, 95.0, 91.0, 100.0]


def _paired_experiment(path):
    runs = _table1()
    _experiment(path, "table1", runs, only={"dataset": "mnist", "layers": "1"})
    for (objective, k), images in IMAGES.items():
        _run(path, _name(objective, k), images=images, index=INDEX)
    _run(path, _name("vae", 5), images=VAE5_IMAGES, index=VAE5_INDEX)
    return runs


def test_every_experiment_has_a_report_section_in_the_registry_s_order():
    """The report renders each experiment of the registry by its name, and nothing else."""
    assert set(SECTIONS) == set(EXPERIMENTS)
    assert all(e.title and not e.title.startswith("#") for e in EXPERIMENTS.values())


def test_verdicts_need_two_standard_errors():
    assert claim_verdict(Margin(-2.0, 0.5, 100), expect=-1) == HOLDS
    assert claim_verdict(Margin(-1.0, 0.5, 100), expect=-1) == NOISE  # exactly 2 SE: not more
    assert claim_verdict(Margin(1.01, 0.5, 100), expect=-1) == FAILS
    assert claim_verdict(Margin(0.3, 0.5, 100), expect=1) == NOISE
    assert claim_verdict(Margin(0.0, 0.0, 4), expect=1) == NOISE  # identical models
    assert (
        claim_verdict(Margin(0.01), expect=1) == HOLDS
        and claim_verdict(Margin(-0.01), expect=1) == FAILS
    )


def test_paired_images_differ_b_minus_a_on_common_images():
    a = (np.array([0, 2, 5, 9]), np.array([1.0, 2.0, 3.0, 4.0]))
    b = (np.array([5, 0, 2, 7]), np.array([6.0, 2.0, 2.0, 100.0]))  # 0, 2, 5 in common
    m = paired_images(a, b)  # differences 1, 0, 3
    assert m.n == 3 and m.diff == pytest.approx(4 / 3)
    assert m.se == pytest.approx(math.sqrt(((1 / 3) ** 2 + (4 / 3) ** 2 + (5 / 3) ** 2) / 2 / 3))
    assert paired_images(a, (np.array([2, 11]), np.array([0.0, 0.0]))) is None  # one in common


def test_paired_margin_matches_images_by_test_index(tmp_path):
    _paired_experiment(tmp_path)
    _, results = load_experiment(tmp_path)
    by = {(r.label["objective"], r.label["k"]): [r] for r in results}
    m = paired_margin(
        by[("vae", 5)], by[("iwae", 5)], "nll"
    )  # images 0, 3, 5, 7 in common; 9 left out
    assert (
        m.n == 4 and m.diff == pytest.approx(-2.0) and m.se == pytest.approx(math.sqrt(4 / 3) / 2)
    )
    m = paired_margin(by[("iwae", 1)], by[("iwae", 5)], "nll")
    assert m.diff == pytest.approx(-0.25) and m.se == pytest.approx(math.sqrt(0.75) / 2)
    m = paired_margin(
        by[("iwae", 5)], by[("iwae", 50)], "log_px"
    )  # log p(x) rises by 2 on every image
    assert m.diff == pytest.approx(2.0) and m.se == pytest.approx(0.0)
    assert paired_margin([], by[("iwae", 5)], "nll") is None


def test_table1_claims_give_margins_standard_errors_and_verdicts(tmp_path):
    _paired_experiment(tmp_path)
    text = write_report(tmp_path).read_text()
    assert (
        "- mnist, 1 layer(s): IWAE below VAE in NLL for every k > 1 — **does not hold** (k=5: "
        "IWAE 93.00 vs VAE 96.00, k=50: IWAE 91.00 vs VAE 89.00); margin ± paired standard error "
        "over 4 test images: k=5: IWAE − VAE = -2.00 ± 0.58 (holds), k=50: IWAE − VAE = +2.00 ± "
        "0.58 (does not hold)"
    ) in text
    assert (
        "- mnist, 1 layer(s): IWAE NLL falling with k — **within noise** (k=1: 93.25, k=5: 93.00, "
        "k=50: 91.00); margin ± paired standard error over 4 test images: k=5 − k=1 = -0.25 ± "
        "0.43 (within noise), k=50 − k=5 = -2.00 ± 0.00 (holds)"
    ) in text
    # random subsets of 4 (5) of the 10,000 images: marked beside the number, explained below
    # the table
    assert "| mnist | 1 | 5 | 96.00† | 86.47 | 9.53 | 93.00† | 85.54 | 7.46 |" in text
    assert "† evaluated on a seeded random subset of 4 of the 10,000 test images." in text
    assert "† evaluated on a seeded random subset of 5 of the 10,000 test images." in text


def test_claims_without_per_image_values_say_so(tmp_path):
    _experiment(tmp_path, "table1", _table1())
    for (objective, k), nll in {("vae", 5): 94.0, ("iwae", 5): 93.0, ("iwae", 1): 95.0}.items():
        _run(tmp_path, _name(objective, k), nll=nll)
    text = write_report(tmp_path).read_text()
    assert (
        "IWAE below VAE in NLL for every k > 1 — **holds** (k=5: IWAE 93.00 vs VAE 94.00) — no "
        "per-image values: standard error unavailable"
    ) in text


def test_a_grid_with_one_k1_objective_fills_both_columns_of_table1(tmp_path):
    """At k=1 the VAE and the IWAE are one objective: a grid that trained only IWAE k=1 (as
    `--only k=1` at the paper's budget did) shows its number in both columns, with a note."""
    _experiment(tmp_path, "table1", _table1(), only={"k": "1"})
    _run(tmp_path, _name("iwae", 1), nll=86.07)
    text = write_report(tmp_path).read_text()
    assert (
        "| mnist | 1 | 1 | 86.07 | 86.76 | -0.69 | 86.07 | 86.76 | -0.69 | 20 | 19 | 20 | 19 |"
        in text
    )
    assert "k=1: VAE and IWAE are one objective (the one-sample ELBO)" in text
    assert "active units as VAE" not in text  # the one run against itself: no ordering
    _paired_experiment(tmp_path / "both")  # both trained: no note
    assert "where a grid trained one of them" not in write_report(tmp_path / "both").read_text()


def _ladder_experiments(root):
    """MNIST 1 layer at 13 passes (one cell evaluated on the first 2,000 images, one on the
    whole set, one on a random subset) and at 121 passes (one run finished, one training)."""
    s3, s5 = root / "table1-mnist", root / "table1-mnist-s5"
    _experiment(s3, "table1", _table1(stages=3))
    _run(s3, _name("iwae", 5), nll=93.81, first_n=2000)
    _run(s3, _name("vae", 5), nll=94.0)
    _run(s3, _name("iwae", 50), images=[92.0, 93.0], index=[4, 8])
    _experiment(s5, "table1", _table1(stages=5), stages=5)
    _run(
        s5, _name("iwae", 5), stage_ends={1: 110.0, 4: 100.0, 13: 95.5, 40: 92.25}
    )  # training: no evaluation
    _run(
        s5,
        _name("vae", 5),
        nll=90.0,
        stage_ends={1: 111.0, 4: 101.0, 13: 94.5, 40: 91.0, 121: 90.5},
    )


def test_budget_ladder_lists_every_budget_and_never_puts_a_first_n_evaluation_beside_the_paper(
    tmp_path,
):
    _ladder_experiments(tmp_path)
    text = write_report(tmp_path).read_text()
    ladder = text[
        text.index("the budget ladder") : text.index(
            "## Burda et al. (2016), Table 1 (MNIST), 13 passes\n"
        )
    ]
    assert "from `table1-mnist/` (13 passes), `table1-mnist-s5/` (121 passes)" in ladder
    assert (
        "| layers | k | objective | 13 passes | 40 passes | 121 passes | paper (3,280 passes) | Δ "
        "to the paper |" in ladder
    )
    # the first-N evaluation is replaced by the stage-end subset value of the longer run; a final
    # evaluation takes precedence over a stage-end value; Δ from the largest budget with a number
    assert "| 1 | 5 | IWAE | 95.50§ | 92.25§ | — | 85.54 | +6.71 at 40 passes |" in ladder
    assert "| 1 | 5 | VAE | 94.00 | 91.00§ | 90.00 | 86.47 | +3.53 at 121 passes |" in ladder
    assert "| 1 | 50 | IWAE | 92.50† | — | — | 84.78 | +7.72 at 13 passes |" in ladder
    assert "| 1 | 1 | VAE | — | — | — | 86.76 | — |" in ladder
    assert (
        "§ no final evaluation at this budget (yet): −L_5000 at the end of the training stage on "
        "a seeded random subset of 1,000 test images" in ladder
    )
    assert "† evaluated on a seeded random subset of 2 of the 10,000 test images." in ladder
    # the 13-pass directory's own table: "—‡" and a note, never 93.81 beside 85.54
    assert "| mnist | 1 | 5 | 94.00 | 86.47 | 7.53 | —‡ | 85.54 | — |" in text
    assert "—‡ evaluated on the first 2,000 of the 10,000 test images: re-evaluate" in text
    assert not [line for line in text.splitlines() if line.startswith("|") and "93.81" in line]
    assert "on the first 2,000 test images (evaluated before test subsets were random" in text
    assert (tmp_path / "figures" / "table1-ladder-mnist.png").stat().st_size > 0
    assert "![test NLL against passes, MNIST](figures/table1-ladder-mnist.png)" in ladder


def test_budget_ladder_puts_the_independent_reproduction_beside_the_paper(tmp_path):
    """MNIST's ladder has nbip/IWAE's full-schedule NLL (shipped with the package, with its
    source) and our latest number's distance to it; OMNIGLOT, which it did not run, has not."""
    from iwae.report.results import independent_reproductions, independent_table1

    assert "nbip/IWAE" in independent_reproductions()["source"]
    refs = independent_table1()
    assert refs[("mnist", 1, 1, "iwae")] == 86.35 and refs[("mnist", 1, 5, "iwae")] == 85.18
    assert refs[("mnist", 1, 5, "vae")] == 86.10 and ("mnist", 1, 5, "iwae_dreg") not in refs
    _ladder_experiments(tmp_path)
    # an IWAE k=1 run in training (no VAE k=1 run): its numbers are the VAE k=1 cell's too
    _run(
        tmp_path / "table1-mnist-s5",
        _name("iwae", 1),
        stage_ends={1: 111.0, 4: 101.0, 13: 95.0, 40: 91.0, 121: 89.0},
    )
    omniglot = tmp_path / "table1-omniglot"
    _experiment(omniglot, "table1", _table1(dataset="omniglot"))
    _run(omniglot, "omniglot-l1-iwae-k5-s0", nll=110.0, size=8070)
    text = write_report(tmp_path).read_text()
    mnist = text[text.index("(MNIST): the budget ladder") : text.index("(OMNIGLOT): the budget")]
    assert (
        "| paper (3,280 passes) | Δ to the paper | nbip/IWAE (3,280 passes) | Δ to nbip/IWAE |"
        in mnist
    )
    assert (
        "| 1 | 5 | VAE | 94.00 | 91.00§ | 90.00 | 86.47 | +3.53 at 121 passes | 86.10 "
        "| +3.90 at 121 passes |" in mnist
    )
    assert (
        "| 1 | 5 | IWAE | 95.50§ | 92.25§ | — | 85.54 | +6.71 at 40 passes | 85.18 "
        "| +7.07 at 40 passes |" in mnist
    )
    assert "nbip/IWAE: an independent reproduction of Table 1 at the paper's budget" in mnist
    for objective in ("VAE", "IWAE"):  # k=1: one objective, one row of numbers for both
        assert (
            f"| 1 | 1 | {objective} | 95.00§ | 91.00§ | 89.00§ | 86.76 | +2.24 at 121 passes "
            "| 86.35 | +2.65 at 121 passes |" in mnist
        )
    assert "k=1: VAE and IWAE are one objective" in mnist
    omniglot_ladder = text[text.index("(OMNIGLOT): the budget ladder") :]
    omniglot_ladder = omniglot_ladder[: omniglot_ladder.index("![")]
    assert "| 1 | 5 | IWAE | 110.00 | 106.12 | +3.88 at 13 passes |" in omniglot_ladder
    assert "nbip" not in omniglot_ladder


def test_budget_ladder_shows_a_stage_evaluation_of_a_run_still_training(tmp_path):
    """A whole-test-set evaluation of the training run's weights after 40 passes
    (``stages/40/``, written by ``iwae evaluate`` of an unfinished run) takes the place of its
    stage-end subset value there, marked ¶; at 13 passes the subset value stays."""
    _ladder_experiments(tmp_path)
    run = tmp_path / "table1-mnist-s5" / "runs" / _name("iwae", 5)
    (run / "stages" / "40").mkdir(parents=True)
    write_evaluation(
        run / "stages" / "40",
        {"nll": 91.75, "log_px": -91.75, "k": 5000, "n_test": MNIST_TEST, "passes": 40},
        {"log_px": -torch.full((3,), 91.75)},
        [0, 1, 2],
    )
    (run / "stages" / "41").mkdir()  # no evaluation in it: not a budget
    text = write_report(tmp_path).read_text()
    ladder = text[text.index("the budget ladder") : text.index("![test NLL against passes")]
    assert "| 13 passes | 40 passes | 121 passes | paper" in ladder
    assert "| 1 | 5 | IWAE | 95.50§ | 91.75¶ | — | 85.54 | +6.21 at 40 passes |" in ladder
    assert (
        "¶ the weights at the end of that training stage, evaluated as the final evaluations "
        "are while the run trained on" in ladder
    )
    assert "91.75" not in text[text.index("## Burda et al. (2016), Table 1 (MNIST), 121 passes") :]


def test_a_first_n_omniglot_evaluation_is_never_beside_the_paper(tmp_path):
    runs = _table1(dataset="omniglot")
    _experiment(tmp_path, "table1", runs)
    _run(tmp_path, "omniglot-l1-iwae-k5-s0", nll=114.97, first_n=2000, size=8070)
    text = write_report(tmp_path).read_text()
    assert "| 1 | 5 | IWAE | —‡ | 106.12 | — |" in text
    assert "—‡ evaluated on the first 2,000 of the 8,070 test images: re-evaluate" in text
    assert "114.97" not in "".join(line for line in text.splitlines() if line.startswith("|"))
    assert (tmp_path / "figures" / "table1-ladder-omniglot.png").exists()


def test_evaluated_images():
    assert evaluated_images(
        {"n_test": 10_000, "test_set_size": 10_000, "test_subset_seed": None}, "mnist"
    ) == ("whole", 10_000, 10_000)
    assert (
        evaluated_images(
            {"n_test": 1000, "test_set_size": 8070, "test_subset_seed": 0}, "omniglot"
        )[0]
        == "random"
    )
    assert evaluated_images({"n_test": 2000}, "omniglot") == (
        "first",
        2000,
        8070,
    )  # an old evaluation
    assert (
        evaluated_images({"nll": 90.0}, "mnist")[0] == "whole"
    )  # no record of the images: the whole set


def test_two_stage_claims_are_paired(tmp_path):
    runs = grid("two-stage", stages=2)
    _experiment(tmp_path, "two-stage", runs, stages=2)
    # experiment 1: the second stage lowers the NLL by 1, 1.5, 1, 1.5 (holds); experiment 2:
    # raises it by -0.5, +1, -0.5, +1 (mean 0.25, SE 0.433: within noise)
    images = {
        "exp1-first-vae-k1-s0": [95.0, 95.0, 96.0, 96.0],
        "exp1-second-iwae-k50-s0": [94.0, 93.5, 95.0, 94.5],
        "exp2-first-iwae-k50-s0": [93.0, 93.0, 94.0, 94.0],
        "exp2-second-vae-k1-s0": [92.5, 94.0, 93.5, 95.0],
    }
    for name, values in images.items():
        _run(tmp_path, name, images=values, index=INDEX)
    text = write_report(tmp_path).read_text()
    assert (
        "vae then iwae k=50: the second stage lowers the NLL (paper 86.76 → 84.88) — **holds** "
        "(95.50 → 94.25); margin ± paired standard error over 4 test images: second − first = "
        "-1.25 ± 0.14 (holds)"
    ) in text
    assert (
        "iwae k=50 then vae: the second stage raises the NLL (paper 84.78 → 86.02) — **within "
        "noise** (93.50 → 93.75); margin ± paired standard error over 4 test images: second − "
        "first = +0.25 ± 0.43 (within noise)"
    ) in text


def test_variants_and_dreg_differences_are_paired(tmp_path):
    variants, dreg = tmp_path / "variants", tmp_path / "dreg"
    runs = grid("variants", stages=2, seeds=1)
    _experiment(variants, "variants", runs, stages=2)
    for r in runs:  # every other method 0.5 or 1 nat better than IWAE on each image; the VAE worse
        images = {"IWAE": [90.0] * 4, "VAE": [91.0] * 4}.get(
            r.label["method"], [89.0, 89.5, 89.0, 89.5]
        )
        _run(variants, r.name, images=images, index=INDEX)
    runs = [r for r in grid("dreg", stages=2) if r.label["layers"] == 1 and r.label["k"] == 5]
    _experiment(dreg, "dreg", runs, stages=2)
    _run(dreg, runs[0].name, images=[90.0, 90.0, 91.0, 91.0], index=INDEX)  # reparam
    _run(
        dreg, runs[1].name, images=[89.0, 89.5, 90.0, 90.5], index=INDEX
    )  # DReG: -1, -0.5, -1, -0.5
    text = write_report(tmp_path).read_text()
    assert (
        "PIWAE, MIWAE and CIWAE above IWAE in IWAE-64 (paper: −85.60 to −86.08 vs −86.11) — "
        "**holds**" in text
    )
    assert "PIWAE(4,16) − IWAE = +0.75 ± 0.14 (holds)" in text
    assert (
        "the VAE lowest in log p̂(x), the worst generative model (paper: −86.21 vs −84.40 to "
        "−85.24) — **holds**" in text
    )
    assert "VAE − CIWAE beta=0.5 = -1.75 ± 0.14 (holds)" in text
    assert "| 1 | 5 | 90.50† | 89.75† | -0.75 ± 0.14 |" in text


def test_ais_section_reads_committed_ais_and_bdmc_results(tmp_path):
    """results/ais/RUN/ais.json and bdmc.json give a table each and the figure's link; without
    them the report has no such section."""
    _paired_experiment(tmp_path / "table1")
    assert "annealed importance sampling" not in write_report(tmp_path).read_text()

    d = tmp_path / "ais" / "mnist-l1-iwae-k50-s0"
    d.mkdir(parents=True)
    (d / "ais.json").write_text(
        json.dumps(
            {
                "method": "ais",
                "log_px_ais": -91.25,
                "log_px_ais_stderr": 0.5,
                "ais_acceptance": 0.7,
                "log_px_iwae": -92.5,
                "iwae_k": 5000,
                "ais_gap": 1.25,
                "ais_gap_stderr": 0.03,
                "ais_steps": 400,
                "chains": 4,
                "hmc_leapfrog": 10,
                "ais_init": "q",
                "n_test": 1000,
                "ais_seconds": 600.0,
            }
        )
    )
    (d / "bdmc.json").write_text(
        json.dumps(
            {
                "steps": [10, 100],
                "lower": [-95.0, -92.0],
                "upper": [-80.0, -91.0],
                "gap": [15.0, 1.0],
                "seconds": [3.0, 30.0],
                "n": 100,
                "chains": 4,
            }
        )
    )
    (d / "bdmc.png").write_bytes(b"")
    (tmp_path / "ais" / "broken").mkdir()
    (tmp_path / "ais" / "broken" / "ais.json").write_text("{not json")
    text = write_report(tmp_path).read_text()
    assert "## log p(x) beyond L_5000: annealed importance sampling and BDMC" in text
    assert (
        "| mnist-l1-iwae-k50-s0 | 1,000 | 400 | 4 | 10 | q | 0.70 | -92.50 | -91.25 ± 0.50 | "
        "+1.25 ± 0.03 | 600 s |" in text
    )
    assert "| mnist-l1-iwae-k50-s0 | 100 | 4 | 10 | -95.00 | -80.00 | 15.00 | 3 s |" in text
    assert "| mnist-l1-iwae-k50-s0 | 100 | 4 | 100 | -92.00 | -91.00 | 1.00 | 30 s |" in text
    assert "![BDMC mnist-l1-iwae-k50-s0](ais/mnist-l1-iwae-k50-s0/bdmc.png)" in text
    assert "broken" not in text


def _likelihood_run(root, name, likelihood, log_px, index, arch="mlp", bits=True):
    """A run directory of ``likelihoods/`` with the files ``iwae train``, ``evaluate`` and
    ``sample`` write; per-image L_k ``log_px`` on the test images ``index``."""
    import safetensors.torch

    d = root / "likelihoods" / name
    d.mkdir(parents=True)
    config = {"dataset": "mnist", "likelihood": likelihood, "arch": arch, "layers": 1}
    if arch == "conv":
        config.update(channels=[32, 64], latent=[50])  # as config.json records them
    (d / "config.json").write_text(json.dumps(config))
    (d / "summary.json").write_text(json.dumps({"passes": 13, "train_seconds": 1234.4}))
    safetensors.torch.save_file(
        {"w": torch.zeros(10, 3), "b": torch.zeros(5)}, d / "model.safetensors"
    )
    log_px = torch.tensor(log_px, dtype=torch.float64)
    nll = float(-log_px.mean())
    result = {
        "nll": nll,
        "nll_stderr": float(log_px.std() / math.sqrt(len(log_px))),
        "elbo": -nll - 5.0,
        "active_units": [7],
        "n_test": len(log_px),
        "k": 5000,
    }
    if bits:
        result["bits_per_dim"] = nll / (784 * math.log(2))
    per_image = {"log_px": log_px, "iwae64": log_px.clone(), "elbo": log_px - 5.0}
    write_evaluation(d, result, per_image, index)
    (d / "samples.png").write_bytes(b"")


def test_likelihoods_section_gives_nats_bits_and_paired_differences(tmp_path):
    """results/likelihoods/RUN gives a row per run in nats and bits/dim, the paired
    difference of two runs of one likelihood on their common images (in both units, by
    the constant 784 ln 2), what each number is comparable to, and the sample grids."""
    _paired_experiment(tmp_path / "table1")
    assert "Beyond binarized pixels" not in write_report(tmp_path).read_text()

    _likelihood_run(tmp_path, "mnist8-mlp", "logistic-256", [-800.0, -900.0, -1000.0], [4, 2, 9])
    # the conv run saw images 2, 4 and 7: the common ones are 2 and 4 (nll -10 and -20 lower)
    _likelihood_run(
        tmp_path, "mnist8-conv", "logistic-256", [-880.0, -790.0, -500.0], [2, 4, 7], arch="conv"
    )
    _likelihood_run(
        tmp_path, "mnistgrey-cb", "continuous-bernoulli", [100.0, 300.0], [0, 1], bits=False
    )
    text = write_report(tmp_path).read_text()
    assert "## Beyond binarized pixels: likelihoods for grey and 8-bit MNIST" in text
    bits = 900.0 / (784 * math.log(2))
    assert (
        "| mnist8-mlp | 8-bit levels v = 0..255 | logistic-256 | MLP, 1 stochastic layer | 35 "
        f"| 13 | 1,234 s | 3 | 900.00 ± 57.74 | {bits:.4f} | -905.00 | 7 |" in text
    )
    assert (
        "| mnist8-conv | 8-bit levels v = 0..255 | logistic-256 | conv 32,64, latent 50 |" in text
    )
    assert "| mnistgrey-cb | grey values in [0, 1] | continuous-bernoulli |" in text
    assert "| -200.00 ± 100.00 | — |" in text  # a density: no bits/dim
    # conv - mlp over images 2 and 4: differences -20 and -10 nats
    scale = 1 / (784 * math.log(2))
    assert (
        "- mnist8-conv − mnist8-mlp, paired over the 2 test images both saw: -15.00 ± 5.00 "
        f"nats, {-15 * scale:+.4f} ± {5 * scale:.4f} bits/dim." in text
    )
    assert "mnistgrey-cb − " not in text and " − mnistgrey-cb" not in text  # other likelihood
    assert "**logistic-256** is a distribution over the 256 levels" in text
    assert "**continuous-Bernoulli** (and Gaussian) values are log-densities" in text
    assert "![mnist8-conv](likelihoods/mnist8-conv/samples.png)" in text


# -- the learning-curve figure -------------------------------------------------------------


def _curve_runs(runs, bound=lambda label, p: -100.0 - p):
    """RunResults of ``runs`` (experiments.Run) with a test IWAE-64 logged at passes 1, 4 and 13."""
    return [
        RunResult(
            r.name,
            r.label,
            r.config,
            {"nll": 90.0},
            None,
            None,
            [{"pass": p, "test_iwae64": bound(r.label, p)} for p in (1, 4, 13)],
            None,
        )
        for r in runs
    ]


def _panels(fig):
    """Per panel of ``fig`` (legend aside): its title and its lines' (colour, style, label)."""
    return {
        ax.get_title(): [
            (to_hex(line.get_color()), line.get_linestyle(), line.get_label())
            for line in ax.get_lines()
        ]
        for ax in fig.axes
    }


def test_table1_curves_are_small_multiples_coloured_by_k_styled_by_objective():
    fig = curves_figure(_curve_runs(grid("table1", 3)))
    panels = _panels(fig)
    assert list(panels) == [
        "MNIST, 1 stochastic layer",
        "MNIST, 2 stochastic layers",
        "OMNIGLOT, 1 stochastic layer",
        "OMNIGLOT, 2 stochastic layers",
    ]
    for lines in panels.values():
        assert [label for _, _, label in lines] == [
            "k=1 VAE",
            "k=1 IWAE",
            "k=5 VAE",
            "k=5 IWAE",
            "k=50 VAE",
            "k=50 IWAE",
        ]
        colours = {label.split()[0]: colour for colour, _, label in lines}
        assert colours == {
            "k=1": "#1f77b4",
            "k=5": "#ff7f0e",
            "k=50": "#2ca02c",
        }  # tab:blue, orange, green
        assert [style for _, style, _ in lines] == ["--", "-"] * 3
    ax = fig.axes[0]
    assert ax.get_xlabel() == "passes over the training set" and ax.get_ylabel().startswith(
        "test IWAE-64"
    )
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == [
        label for _, _, label in lines
    ]
    _plt_close(fig)


def test_curves_never_repeat_a_colour_within_a_panel():
    """Twelve values of k in one panel (more than matplotlib's ten-colour cycle), and
    Rainforth et al.'s eight variants with two seeds each (averaged: eight lines)."""
    ks = [1, 2, 3, 5, 8, 10, 20, 50, 64, 100, 500, 1000]
    runs = [
        Run(
            f"k{k}",
            {"dataset": "mnist"},
            label={"dataset": "mnist", "layers": 1, "k": k, "objective": "iwae", "seed": 0},
        )
        for k in ks
    ]
    runs.append(
        Run(
            "vae",
            {"dataset": "mnist"},
            label={"dataset": "mnist", "layers": 1, "k": 1, "objective": "vae", "seed": 0},
        )
    )
    fig = curves_figure(_curve_runs(runs))
    (lines,) = _panels(fig).values()
    iwae = [(colour, label) for colour, style, label in lines if style == "-"]
    assert [label for _, label in iwae] == [f"k={k} IWAE" for k in ks]
    assert len({colour for colour, _ in iwae}) == 12
    assert [label for _, _, label in lines][:2] == ["k=1 VAE", "k=1 IWAE"] and lines[0][0] == lines[
        1
    ][0] == "#1f77b4"
    _plt_close(fig)

    fig = curves_figure(
        _curve_runs(grid("variants", 1, seeds=2), bound=lambda label, p: -100.0 - label["seed"])
    )
    (lines,) = _panels(fig).values()
    assert len(lines) == 8 and len({colour for colour, _, _ in lines}) == 8
    assert {style for _, style, _ in lines} == {"-"} and lines[0][2] == "CIWAE beta=0.05"
    assert all(
        list(line.get_ydata()) == [-100.5] * 3 for line in fig.axes[0].get_lines()
    )  # the two seeds' mean
    _plt_close(fig)


def _plt_close(fig):
    plt.close(fig)


def test_the_budget_line_names_runs_trained_on_a_gpu_and_lost_metrics(tmp_path):
    """A run trained on a GPU (summary.json ``device`` cuda) is named with the GPU and its
    training minutes, the hours are no longer called CPU hours, and a run whose per-pass
    metrics were lost (``recovered``) is named too."""
    runs = _table1(dataset="omniglot")
    _experiment(tmp_path, "table1", runs, stages=5)
    for name, device in (("omniglot-l1-iwae-k50-s0", "cuda:0"), ("omniglot-l1-vae-k50-s0", "cpu")):
        _run(tmp_path, name, nll=110.0, size=8070)
        d = tmp_path / "runs" / name
        (d / "runner.json").write_text(json.dumps({"train_wall_s": 1800.0, "eval_wall_s": 1800.0}))
        summary = {"passes": 121, "train_seconds": 240.0, "device": device}
        if device != "cpu":
            summary |= {"gpu": "NVIDIA H100 80GB HBM3", "recovered": "metrics lost"}
        (d / "summary.json").write_text(json.dumps(summary))
    text = write_report(tmp_path).read_text()
    assert (
        ", 2.0 process hours in all (train + evaluate); trained on a GPU (NVIDIA H100 80GB HBM3): "
        "omniglot-l1-iwae-k50-s0, 4 GPU minutes of training in all; per-pass metrics lost "
        "(`recovered` in `summary.json`): omniglot-l1-iwae-k50-s0." in text
    )
    (tmp_path / "runs" / "omniglot-l1-iwae-k50-s0" / "summary.json").write_text(
        json.dumps({"device": "cpu"})
    )
    text = write_report(tmp_path).read_text()
    assert ", 2.0 CPU-process hours in all (train + evaluate)." in text and "GPU" not in text


def test_the_budget_line_counts_gpu_time_by_machine_for_runs_that_moved(tmp_path):
    """runner.json's ``train_wall_s_by_device`` decides: a run trained on a GPU and finished on
    a CPU is named "(in part)" and only its GPU seconds count as GPU minutes; one stopped on
    the GPU (no summary.json yet) is named too; a run trained on the CPU only is not."""
    runs = _table1(dataset="omniglot")
    _experiment(tmp_path, "table1", runs, stages=5)
    gpu = "cuda (NVIDIA H100 80GB HBM3)"
    by_device = {
        "omniglot-l1-iwae-k50-s0": {gpu: 600.0, "cpu (AMD EPYC)": 1200.0},
        "omniglot-l1-vae-k50-s0": {"cpu (AMD EPYC)": 1800.0},
        "omniglot-l1-iwae-k5-s0": {gpu: 1800.0},
    }
    for name, seconds in by_device.items():
        d = tmp_path / "runs" / name
        if name.endswith("k50-s0"):
            _run(tmp_path, name, nll=110.0, size=8070)
            (d / "summary.json").write_text(
                json.dumps({"passes": 121, "train_seconds": 1700.0, "device": "cpu"})
            )
        else:
            d.mkdir(parents=True)
        (d / "runner.json").write_text(
            json.dumps({"train_wall_s": 1800.0, "train_wall_s_by_device": seconds})
        )
    text = write_report(tmp_path).read_text()
    assert (
        ", 1.5 process hours in all (train + evaluate); trained on a GPU (NVIDIA H100 80GB HBM3): "
        "omniglot-l1-iwae-k5-s0, omniglot-l1-iwae-k50-s0 (in part), 40 GPU minutes of training in "
        "all." in text
    )
    assert "omniglot-l1-vae-k50-s0," not in text


def test_the_budget_line_counts_a_lockstep_group_s_time_once(tmp_path):
    """Runs trained together in one lockstep group share its time: four runs that trained
    side by side for 600 s on a GPU took 10 GPU minutes, not 40 (``train_share_s_by_device``),
    and a CPU pair from before shares were recorded (a ``lockstep`` key naming both) took
    its wall time once."""
    runs = _table1(dataset="omniglot")
    _experiment(tmp_path, "table1", runs, stages=5)
    gpu = "cuda (NVIDIA H100 80GB HBM3)"
    group = [r.name for r in runs[:4]]
    for name in group:
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "runner.json").write_text(
            json.dumps(
                {
                    "train_wall_s": 600.0,
                    "train_wall_s_by_device": {gpu: 600.0},
                    "train_share_s_by_device": {gpu: 150.0},
                }
            )
        )
    pair = [r.name for r in runs[4:6]]
    for name in pair:
        _run(tmp_path, name, nll=110.0, size=8070)
        (tmp_path / "runs" / name / "runner.json").write_text(
            json.dumps({"train_wall_s": 7200.0, "eval_wall_s": 900.0, "lockstep": pair})
        )
    text = write_report(tmp_path).read_text()
    # 4 x 150 s on the GPU, 7,200 s of the pair's process and 2 x 900 s of evaluation: 2.7 hours
    assert (
        ", 2.7 process hours in all (train + evaluate); trained on a GPU (NVIDIA H100 80GB HBM3): "
        in text
    )
    assert ", 10 GPU minutes of training in all." in text


def test_the_budget_line_counts_runs_stopped_at_a_time_limit(tmp_path):
    """A run stopped by ``--time-limit`` has a ``runner.json`` with its training time but no
    evaluation time (nor an evaluation): the report is still written and counts its hours."""
    runs = _table1(dataset="omniglot")
    _experiment(tmp_path, "table1", runs, stages=5)
    _run(tmp_path, "omniglot-l1-vae-k50-s0", nll=110.0, size=8070)
    (tmp_path / "runs" / "omniglot-l1-vae-k50-s0" / "runner.json").write_text(
        json.dumps({"train_wall_s": 1800.0, "eval_wall_s": 1800.0})
    )
    stopped = tmp_path / "runs" / "omniglot-l1-iwae-k50-s0"
    stopped.mkdir(parents=True)
    (stopped / "runner.json").write_text(json.dumps({"train_wall_s": 3600.0}))
    text = write_report(tmp_path).read_text()
    assert ", 2.0 CPU-process hours in all (train + evaluate)." in text


def test_the_budget_line_counts_a_run_s_own_training_clock_where_runner_json_has_less(tmp_path):
    """A run continued by commands that did not add their wall time to ``runner.json`` still
    counts the training its own metrics record (per-pass ``seconds``), shared by its lockstep
    group; ``summary.json``'s ``train_seconds`` where it has finished."""
    runs = _table1(dataset="omniglot")
    _experiment(tmp_path, "table1", runs, stages=5)
    unfinished = tmp_path / "runs" / "omniglot-l1-iwae-k50-s0"
    unfinished.mkdir(parents=True)
    (unfinished / "runner.json").write_text(json.dumps({"train_wall_s": 600.0}))
    passes = [{"pass": p, "seconds": 20.0} for p in range(1, 361)]  # 7,200 s
    (unfinished / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in passes))
    text = write_report(tmp_path).read_text()
    assert ", 2.0 CPU-process hours in all (train + evaluate)." in text
    # the same run in a lockstep pair: half of it
    (unfinished / "runner.json").write_text(
        json.dumps({"train_wall_s": 600.0, "lockstep": ["a", "b"]})
    )
    assert ", 1.0 CPU-process hours in all" in write_report(tmp_path).read_text()
    # finished: summary.json's clock
    (unfinished / "runner.json").write_text(json.dumps({"train_wall_s": 600.0}))
    (unfinished / "summary.json").write_text(json.dumps({"passes": 121, "train_seconds": 10800.0}))
    assert ", 3.0 CPU-process hours in all" in write_report(tmp_path).read_text()


def test_two_directories_of_one_budget_are_told_apart_in_their_headings(tmp_path):
    """Two Table 1 directories at 121 passes (a grid split by --only) share a title: each
    heading names its directory; a title that is not repeated stays as it is."""
    _ladder_experiments(tmp_path)
    k5 = tmp_path / "table1-mnist-s5-k5"
    _experiment(k5, "table1", _table1(stages=5), stages=5)
    _run(k5, _name("iwae", 50), nll=88.0)
    text = write_report(tmp_path).read_text()
    title = "## Burda et al. (2016), Table 1 (MNIST), 121 passes"
    assert f"{title}: `table1-mnist-s5/`\n" in text
    assert f"{title}: `table1-mnist-s5-k5/`\n" in text
    assert f"{title}\n" not in text
    assert "## Burda et al. (2016), Table 1 (MNIST), 13 passes\n" in text
