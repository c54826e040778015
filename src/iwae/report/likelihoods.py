"""The report's section on likelihoods beyond binarized pixels: the run directories in
``likelihoods/`` (``scripts/likelihoods.sh``: plain ``iwae train`` runs, each with its
``evaluation.json`` and a ``samples.png``), in nats and in bits per dimension, with paired
differences between runs of one likelihood on the same test images, and what the numbers
can be compared with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iwae.report.claims import Margin, paired_images
from iwae.report.results import read_json_or_none
from iwae.rundir import (
    CONFIG_FILE,
    EVALUATION_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    read_evaluation_images,
    read_safetensors,
)

#: the directory of these runs in a report's directory
LIKELIHOODS_DIR = "likelihoods"
#: each run's grid of samples (``iwae sample RUN --out RUN/samples.png``)
SAMPLES_FILE = "samples.png"

_DATA = {  # likelihood -> what the model sees of each image
    "bernoulli": "binarized pixels",
    "logistic-256": "8-bit levels v = 0..255",
    "continuous-bernoulli": "grey values in [0, 1]",
    "gaussian": "real values",
}


def _joined(value) -> str:
    """A config value as the command line writes it: a list as comma-separated numbers."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


@dataclass
class LikelihoodRun:
    """One run of ``likelihoods/``: its directory and files as the section reads them."""

    path: Path
    config: dict
    summary: dict | None
    evaluation: dict

    @property
    def likelihood(self) -> str:
        return self.config.get("likelihood", "bernoulli")

    @property
    def model(self) -> str:
        """The architecture in words: the MLP's stochastic layers or the conv net's widths."""
        c = self.config
        if c.get("arch", "mlp") == "conv":
            return f"conv {_joined(c.get('channels'))}, latent {_joined(c.get('latent') or 50)}"
        layers = c.get("layers", 1)
        return f"MLP, {layers} stochastic layer{'s' if layers != 1 else ''}"

    def parameters(self) -> int:
        tensors, _ = read_safetensors(self.path / WEIGHTS_FILE)
        return sum(t.numel() for t in tensors.values())

    def log_px(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(test index, per-image L_k), or None without per-image values."""
        images = read_evaluation_images(self.path)
        if images is None:
            return None
        return images["test_index"].numpy(), images["log_px"].double().numpy()


def read_runs(directory: Path) -> list[LikelihoodRun]:
    """The evaluated runs in ``directory/likelihoods/``, by likelihood, the MLP before the
    convolutional model, then by name."""
    runs = []
    for path in sorted((Path(directory) / LIKELIHOODS_DIR).glob("*")):
        config = read_json_or_none(path / CONFIG_FILE)
        evaluation = read_json_or_none(path / EVALUATION_FILE)
        if isinstance(config, dict) and isinstance(evaluation, dict) and "nll" in evaluation:
            summary = read_json_or_none(path / SUMMARY_FILE)
            runs.append(LikelihoodRun(path, config, summary, evaluation))
    return sorted(runs, key=lambda r: (r.likelihood, r.config.get("arch") == "conv", r.path.name))


def nll_margin(a: LikelihoodRun, b: LikelihoodRun) -> Margin | None:
    """NLL(b) − NLL(a) in nats, paired over the test images both were evaluated on; None
    when they share fewer than two images."""
    pa, pb = a.log_px(), b.log_px()
    if pa is None or pb is None:
        return None
    return paired_images(pb, pa)  # log p_a - log p_b = NLL_b - NLL_a


def likelihoods_section(directory: Path) -> list[str]:
    """The section's Markdown lines; none where ``directory/likelihoods/`` holds no
    evaluated run."""
    runs = read_runs(directory)
    if not runs:
        return []
    lines = [
        "## Beyond binarized pixels: likelihoods for grey and 8-bit MNIST",
        "",
        "Each run: `iwae train --likelihood L` (`--arch conv` for the convolutional model), "
        "then `iwae evaluate --k 5000` on a seeded random subset of the test images (the same "
        "images for every run) and `iwae sample` (`scripts/likelihoods.sh`). NLL = −L_5000 "
        "in nats per image, ± its standard error over images; bits/dim = NLL / (D ln 2), "
        "D = 784.",
        "",
        "| run | data | likelihood | model | parameters | passes | training | test images "
        "| NLL (nats) | bits/dim | ELBO | active units |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r) for r in runs]
    lines += [""] + _differences(runs) + _comparable(runs) + _samples(runs)
    return lines


def _row(r: LikelihoodRun) -> str:
    e, s = r.evaluation, r.summary or {}
    bits = f"{e['bits_per_dim']:.4f}" if "bits_per_dim" in e else "—"
    seconds = s.get("train_seconds")
    training = f"{seconds:,.0f} s" if isinstance(seconds, (int, float)) else "—"
    units = "+".join(str(u) for u in e.get("active_units", []))
    return (
        f"| {r.path.name} | {_DATA.get(r.likelihood, '—')} | {r.likelihood} | {r.model} "
        f"| {r.parameters():,} | {s.get('passes', '—')} | {training} | {e['n_test']:,} "
        f"| {e['nll']:.2f} ± {e['nll_stderr']:.2f} | {bits} | {e['elbo']:.2f} | {units} |"
    )


def _differences(runs: list[LikelihoodRun]) -> list[str]:
    """Paired NLL differences between the runs of each likelihood, in nats and bits/dim."""
    lines = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if a.likelihood != b.likelihood or a.config.get("dataset") != b.config.get("dataset"):
                continue
            m = nll_margin(a, b)
            if m is None:
                continue
            scale = 1 / (784 * math.log(2))
            lines.append(
                f"- {b.path.name} − {a.path.name}, paired over the {m.n:,} test images both "
                f"saw: {m.diff:+.2f} ± {m.se:.2f} nats, {m.diff * scale:+.4f} ± "
                f"{m.se * scale:.4f} bits/dim."
            )
    return lines + [""] if lines else []


def _comparable(runs: list[LikelihoodRun]) -> list[str]:
    """What the numbers of the likelihoods present can and cannot be compared with."""
    present = {r.likelihood for r in runs}
    lines = ["What these numbers are comparable to:", ""]
    if "logistic-256" in present:
        lines.append(
            "- **logistic-256** is a distribution over the 256 levels of each pixel (its "
            "masses sum to 1), so its NLL and bits/dim are those of the 8-bit images "
            "themselves: comparable across models and with other papers' bits/dim on 8-bit "
            "MNIST under the same test set and evaluation, and between the MLP and the "
            "convolutional model here, which saw the same images (paired above). The "
            "comparison is at equal passes, not equal compute: the training times and "
            "parameter counts differ."
        )
    if present & {"continuous-bernoulli", "gaussian"}:
        lines.append(
            "- **continuous-Bernoulli** (and Gaussian) values are log-densities on [0, 1]^784, "
            "not probabilities: they can be negative, change with the units of x, and are "
            "comparable only with other densities of the same grey values in [0, 1]. They "
            "are not comparable with logistic-256's masses of the 256 levels (a density "
            "becomes a mass only after dequantization: log mass ≈ log density − 784 ln 256 "
            "for v / 256 on bins of width 1/256)."
        )
    lines.append(
        "- None of them is comparable with the nats of the binarized-MNIST tables above: "
        "binarized pixels carry at most 1 bit each, these data up to 8, and a Bernoulli "
        "NLL of binarized images measures a different quantity."
    )
    lines.append(
        "- The budget is small (13 passes of Burda et al.'s 3,280): the numbers show that "
        "each likelihood and architecture trains and evaluates, not what it reaches."
    )
    return lines + [""]


def _samples(runs: list[LikelihoodRun]) -> list[str]:
    """The sample grids, one per run that has one (the decoder's mean given h ~ p(h))."""
    found = [r for r in runs if (r.path / SAMPLES_FILE).exists()]
    lines = [f"![{r.path.name}]({LIKELIHOODS_DIR}/{r.path.name}/{SAMPLES_FILE})" for r in found]
    caption = (
        "Samples, 100 per run: the decoder's mean E[x | h] (logistic-256: its location) for "
        "h drawn from the prior (`iwae sample`)."
    )
    return ([caption, ""] + lines + [""]) if lines else []
