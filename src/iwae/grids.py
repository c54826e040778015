"""The published experiments' grids: each a list of :class:`Run`, one per training run.

- :func:`table1`    Burda et al. Table 1: MNIST and OMNIGLOT x 1 and 2 stochastic layers x
                    k in {1, 5, 50} x {VAE, IWAE} (24 runs per seed).
- :func:`two_stage` Burda et al. section 5.2: MNIST, 1 layer, VAE then IWAE k=50 and IWAE
                    k=50 then VAE; the second stage continues from the first's weights for
                    3^(N-1) passes at learning rate 1e-4 (3^7 = 2,187 at the paper's N = 8).
- :func:`variants`  Rainforth et al. 2018: the methods of :data:`VARIANTS`, MNIST, 1 layer,
                    64 samples per example.
- :func:`dreg`      beyond the papers: IWAE with the standard and the DReG encoder gradient,
                    MNIST, 1 and 2 layers, k in {5, 50}.

Every grid function takes ``(stages, seeds)``: the first ``stages`` stages of the 3^i
schedule (8 = the paper's 3,280 passes) and the seeds per configuration. And :func:`toy`,
the exact computation behind Theorem 1 of Burda et al. (no training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from iwae.errors import IwaeError

#: samples of log p-hat(x) in learning curves (on the seeded random subset of eval_n test images)
CURVE_K = 1000


@dataclass(frozen=True)
class Run:
    """One training run of a grid, and the runs whose weights it starts from."""

    name: str
    config: dict  # TrainConfig keys
    after: str | None = None  # run whose final weights initialize this one
    label: dict = field(default_factory=dict)  # what the report groups by


def _name(dataset, layers, objective, k, m=1, beta=None, seed=0) -> str:
    """A run's directory name, e.g. ``mnist-l1-iwae-k50-s0`` or ``mnist-l1-piwae-m4k16-s0``."""
    parts = [dataset, f"l{layers}", objective]
    parts += [f"m{m}k{k}"] if m > 1 else [f"k{k}"]
    if beta is not None:
        parts.append(f"b{beta:g}")
    return "-".join(parts) + f"-s{seed}"


def table1(stages: int, seeds: int) -> list[Run]:
    """Burda et al. Table 1: dataset x stochastic layers x k x objective x seed."""
    runs = []
    for dataset in ("mnist", "omniglot"):
        for layers in (1, 2):
            for k in (1, 5, 50):
                for objective in ("vae", "iwae"):
                    for seed in range(seeds):
                        label = dict(
                            dataset=dataset, layers=layers, k=k, objective=objective, seed=seed
                        )
                        config = dict(
                            dataset=dataset,
                            layers=layers,
                            objective=objective,
                            k=k,
                            stages=stages,
                            seed=seed,
                        )
                        name = _name(dataset, layers, objective, k, seed=seed)
                        runs.append(Run(name, config, label=label))
    return runs


#: the two experiments of Burda et al. section 5.2: (first stage, second stage), each
#: (objective, k)
TWO_STAGE = ((("vae", 1), ("iwae", 50)), (("iwae", 50), ("vae", 1)))


def two_stage(stages: int, seeds: int) -> list[Run]:
    """Burda et al. section 5.2: each experiment of :data:`TWO_STAGE` as a first-stage run
    of ``stages`` stages and a second-stage run that continues from its weights."""
    runs = []
    for seed in range(seeds):
        for exp, (first, second) in enumerate(TWO_STAGE, start=1):
            a = Run(
                f"exp{exp}-first-{first[0]}-k{first[1]}-s{seed}",
                dict(
                    dataset="mnist",
                    layers=1,
                    objective=first[0],
                    k=first[1],
                    stages=stages,
                    seed=seed,
                ),
                label=dict(
                    experiment=exp, stage="first", objective=first[0], k=first[1], seed=seed
                ),
            )
            b = Run(
                f"exp{exp}-second-{second[0]}-k{second[1]}-s{seed}",
                dict(
                    dataset="mnist",
                    layers=1,
                    objective=second[0],
                    k=second[1],
                    epochs=3 ** (stages - 1),
                    lr=1e-4,
                    seed=seed,
                ),
                after=a.name,
                label=dict(
                    experiment=exp, stage="second", objective=second[0], k=second[1], seed=seed
                ),
            )
            runs += [a, b]
    return runs


VARIANTS = [  # (label, key in the paper's table, training options)
    ("IWAE", "iwae", dict(objective="iwae", k=64)),
    ("PIWAE(4,16)", "piwae(4,16)", dict(objective="piwae", m=4, k=16)),
    ("PIWAE(8,8)", "piwae(8,8)", dict(objective="piwae", m=8, k=8)),
    ("MIWAE(4,16)", "miwae(4,16)", dict(objective="miwae", m=4, k=16)),
    ("MIWAE(8,8)", "miwae(8,8)", dict(objective="miwae", m=8, k=8)),
    ("CIWAE beta=0.05", "ciwae(beta=0.05)", dict(objective="ciwae", k=64, beta=0.05)),
    ("CIWAE beta=0.5", "ciwae(beta=0.5)", dict(objective="ciwae", k=64, beta=0.5)),
    ("VAE", "vae", dict(objective="vae", k=64)),
]


def variants(stages: int, seeds: int) -> list[Run]:
    """Rainforth et al. 2018: every method of :data:`VARIANTS` x seed, with learning curves
    of log p-hat(x) (:data:`CURVE_K` samples) and no evaluation during the stages."""
    runs = []
    for method, _, keys in VARIANTS:
        for seed in range(seeds):
            config = dict(
                dataset="mnist",
                layers=1,
                stages=stages,
                seed=seed,
                curve_k=CURVE_K,
                eval_every=10**6,
                **keys,
            )
            name = _name(
                "mnist", 1, keys["objective"], keys["k"], keys.get("m", 1), keys.get("beta"), seed
            )
            runs.append(Run(name, config, label=dict(method=method, seed=seed)))
    return runs


def dreg(stages: int, seeds: int) -> list[Run]:
    """IWAE trained with the standard (reparam) and the DReG encoder gradient at the same
    budget: MNIST, 1 and 2 layers, k in {5, 50}."""
    runs = []
    for layers in (1, 2):
        for k in (5, 50):
            for estimator in ("reparam", "dreg"):
                for seed in range(seeds):
                    config = dict(
                        dataset="mnist",
                        layers=layers,
                        objective="iwae",
                        k=k,
                        estimator=estimator,
                        stages=stages,
                        seed=seed,
                    )
                    name = _name("mnist", layers, "iwae", k, seed=seed).replace(
                        "-s", f"-{estimator}-s"
                    )
                    label = dict(layers=layers, k=k, estimator=estimator, seed=seed)
                    runs.append(Run(name, config, label=label))
    return runs


# -- the toy of Theorem 1 -----------------------------------------------------------------------


def toy(a: float, b: float, k_max: int) -> dict:
    """X uniform on {a, b}: E[log((X_1 + ... + X_k)/k)] for k = 1..k_max, exactly, by
    enumerating the number j of a's, j ~ Binomial(k, 1/2), against log E[X]. The gap
    log E[X] - E[log mean] is the bias of L_k; Theorem 1 of Burda et al.: it shrinks
    monotonically in k."""
    if not (a > 0 and b > 0) or not (math.isfinite(a) and math.isfinite(b)):
        raise IwaeError(f"a and b must be positive numbers, got {a} and {b}")
    if k_max < 1:
        raise IwaeError(f"k-max must be >= 1, got {k_max}")
    expected = []
    for k in range(1, k_max + 1):
        log_p = [
            math.lgamma(k + 1) - math.lgamma(j + 1) - math.lgamma(k - j + 1) - k * math.log(2)
            for j in range(k + 1)
        ]
        expected.append(
            sum(math.exp(lp) * math.log((j * a + (k - j) * b) / k) for j, lp in enumerate(log_p))
        )
    log_mean = math.log((a + b) / 2)
    return {
        "a": a,
        "b": b,
        "k": list(range(1, k_max + 1)),
        "expected_log_mean": expected,
        "log_expected": log_mean,
        "bias": [log_mean - e for e in expected],
    }
