"""Evaluation: test log-likelihood, the Rainforth et al. metrics, and active units.

For each test example x, one pass draws k importance samples (5,000 by default, as
in Burda et al.) and keeps three running reductions of their log-weights:

- L_k(x) = logsumexp_s log w_s - log k, the estimate of log p(x) (``log_px``; the
  test NLL is its negative mean, with the standard error over examples);
- IWAE-64 from the first 64 of those samples (``iwae64``);
- the ELBO, the mean of all k log-weights (``elbo``).

Then -KL(Q||P) = IWAE-64 - log p-hat(x) (Rainforth et al. 2018). Work is batched
over examples and samples so that at most ``max_rows`` (example, sample) rows are
alive at once: memory stays bounded for any k.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import Tensor

from iwae.ais import forward_ais
from iwae.bounds import Objective
from iwae.errors import IwaeError
from iwae.latent import LatentVariableModel, gaussian_rsample
from iwae.likelihoods import bits_per_dim
from iwae.memory import reuse_freed_memory
from iwae.progress import progress_bar

#: (example, sample) rows alive at once. Each [rows, 784] float32 buffer (12.8 MB) stays
#: under glibc's mmap threshold, so buffers are reused rather than page-faulted in afresh
#: for every chunk: 1.45-1.5x faster than 32768 rows (bench/README.md).
MAX_ROWS = 4096
#: the same on a GPU, where 4096-row chunks leave it launching small kernels: L_5000 of the
#: 10,000 MNIST test images took 90-105 s per run on an H100 that way (2026-11-27,
#: results/README.md). 65,536 rows (about 200 MB per [rows, 784] buffer) cut the number of
#: chunks, and with it the launches, some 25-fold while staying small beside a GPU's memory.
MAX_ROWS_CUDA = 65536


def default_max_rows(device: torch.device | str) -> int:
    """(example, sample) rows per chunk where none is given: :data:`MAX_ROWS_CUDA` on a
    GPU, :data:`MAX_ROWS` elsewhere. The samples drawn depend on it (seeded per chunk
    layout), so a run evaluated on either kind of device is deterministic there."""
    return MAX_ROWS_CUDA if torch.device(device).type == "cuda" else MAX_ROWS


def _check_test_images(model: LatentVariableModel, x: Tensor) -> None:
    """Test images must lie in the model's likelihood's support: for a Bernoulli decoder 0/1
    (binarized once, as in Burda et al.), never grey."""
    likelihood = model.likelihood
    if likelihood.name != "bernoulli":
        likelihood.check_data(x, "test images")
    elif not bool(((x == 0) | (x == 1)).all()):
        raise IwaeError(
            "test images must be binarized (every pixel 0 or 1), as in Burda et al.; these have "
            "grey values: binarize them once with iwae.data.binarized_test (or binarize_fixed)"
        )


#: the likelihoods of discrete data with 256 levels per dimension, for which an NLL in nats
#: is also reported in bits per dimension (nats / (D ln 2))
EIGHT_BIT_LIKELIHOODS = ("logistic-256",)


def eight_bit_record(model: LatentVariableModel, nll: float, dims: int) -> dict:
    """``{"bits_per_dim": nll / (D ln 2)}`` (the NLL of the 8-bit data in bits per
    dimension) where the model's likelihood is one of :data:`EIGHT_BIT_LIKELIHOODS`,
    else ``{}``."""
    if model.likelihood.name not in EIGHT_BIT_LIKELIHOODS:
        return {}
    return {"bits_per_dim": bits_per_dim(nll, dims)}


def _standard_error(values: Tensor) -> float:
    """Standard error of the mean of ``values`` [N] (NaN for a single value)."""
    n = values.numel()
    return values.std().item() / math.sqrt(n) if n > 1 else float("nan")


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(size, n - start)


@torch.inference_mode()
def log_weight_reductions(
    model: LatentVariableModel,
    x: Tensor,
    k: int,
    k_small: int = 64,
    seed: int = 0,
    max_rows: int | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Per-example L_k, L_{k_small} (first k_small samples) and mean log-weight, each [N].

    Deterministic given ``seed`` (and ``max_rows``; None: :func:`default_max_rows` of the
    device of ``x``). On the CPU the memory of each chunk's tensors is kept for the next
    (:func:`iwae.memory.reuse_freed_memory`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    reuse_freed_memory(x.device)
    max_rows = max_rows or default_max_rows(x.device)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    k_small = min(k_small, k)
    samples_per_chunk = min(k, max_rows)
    examples_per_chunk = max(1, max_rows // samples_per_chunk)
    n = x.shape[0]
    out = {name: torch.empty(n, device=x.device) for name in ("log_px", "small", "elbo")}
    with progress_bar(n, f"L_{k}", "ex", enabled=progress) as bar:
        for e0, ne in _chunks(n, examples_per_chunk):
            xb = x[e0 : e0 + ne]
            lse = torch.full((ne,), -math.inf, device=x.device)
            lse_small = torch.full((ne,), -math.inf, device=x.device)
            total = torch.zeros(ne, device=x.device)
            for s0, ns in _chunks(k, samples_per_chunk):
                log_w = model.log_weights(xb, ns, generator=generator)
                lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
                if s0 < k_small:
                    lse_small = torch.logaddexp(
                        lse_small, torch.logsumexp(log_w[: k_small - s0], 0)
                    )
                total += log_w.sum(0)
            out["log_px"][e0 : e0 + ne] = lse - math.log(k)
            out["small"][e0 : e0 + ne] = lse_small - math.log(k_small)
            out["elbo"][e0 : e0 + ne] = total / k
            bar.update(ne)
    return out


def iwae_bound(model: LatentVariableModel, x: Tensor, k: int, seed: int = 0) -> float:
    """Mean over examples of the IWAE bound L_k."""
    was_training = model.training
    model.eval()
    value = log_weight_reductions(model, x, k, k_small=1, seed=seed)["log_px"].mean().item()
    model.train(was_training)
    return value


@torch.inference_mode()
def unit_activity(
    model: LatentVariableModel,
    x: Tensor,
    n_samples: int = 100,
    seed: int = 0,
    batch_size: int = 1000,
) -> list[Tensor]:
    """Per-unit activity A_u = Cov_x(E_{q(h|x)}[u]) for each stochastic layer (Burda et al.
    sec. 5.2).

    E_q[h_1 | x] is the encoder mean; for layer l > 1, E_q[h_l | x] =
    E_{h_{l-1} ~ q}[mean_l(h_{l-1})] is estimated with ``n_samples`` samples of h_{l-1}.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)
    layers = len(model.latent_sizes)
    means: list[list[Tensor]] = [[] for _ in range(layers)]
    for e0, ne in _chunks(x.shape[0], batch_size):
        u = x[e0 : e0 + ne]
        for l in range(layers):
            mean, log_std = model.q_params(l, u)
            means[l].append(mean if l == 0 else mean.mean(0))
            if l + 1 < layers:
                u, _ = gaussian_rsample(mean, log_std, n_samples if l == 0 else None, generator)
    return [torch.cat(m).var(0, correction=0) for m in means]


def active_units(
    model: LatentVariableModel, x: Tensor, threshold: float = 0.01, **kwargs
) -> list[int]:
    """Number of units with activity Cov_x(E_q[u]) > threshold, one count per layer."""
    return [int((a > threshold).sum()) for a in unit_activity(model, x, **kwargs)]


def evaluate(model: LatentVariableModel, x: Tensor, k: int = 5000, **kwargs) -> dict:
    """All test metrics for test images ``x`` [N, D] (binarized for a Bernoulli decoder):
    the keys of ``iwae evaluate --json`` (the options of :func:`evaluate_images`: ``seed``,
    ``max_rows``, ``progress``)."""
    return evaluate_images(model, x, k, **kwargs)[0]


def evaluate_images(
    model: LatentVariableModel,
    x: Tensor,
    k: int = 5000,
    seed: int = 0,
    max_rows: int | None = None,
    progress: bool = False,
) -> tuple[dict, dict[str, Tensor]]:
    """:func:`evaluate`, and the per-image values behind its means (float32 [N] each):
    ``log_px`` = L_k(x), ``iwae64`` and ``elbo``. Two models evaluated on the same images
    are compared with the paired standard error of their per-image differences.

    For a Bernoulli decoder ``x`` must hold binarized images (every pixel 0 or 1): a grey
    test set is refused, never evaluated as it is (binarize it once with
    :func:`iwae.data.binarized_test`); for another likelihood, values in its support. For
    8-bit data (logistic-256) the result also holds ``bits_per_dim`` = nll / (D ln 2)."""
    _check_test_images(model, x)
    was_training = model.training
    model.eval()
    r = log_weight_reductions(
        model, x, k, k_small=64, seed=seed, max_rows=max_rows, progress=progress
    )
    n = x.shape[0]
    log_px = r["log_px"].double()
    result = {
        "nll": -log_px.mean().item(),
        "nll_stderr": _standard_error(log_px),
        "iwae64": r["small"].double().mean().item(),
        "log_px": log_px.mean().item(),
        "neg_kl_q_p": (r["small"].double() - log_px).mean().item(),
        "elbo": r["elbo"].double().mean().item(),
        "active_units": active_units(model, x, seed=seed),
        "n_test": n,
        "k": k,
    }
    result.update(eight_bit_record(model, result["nll"], x.shape[1]))
    model.train(was_training)
    per_image = {
        name: r[key].cpu()
        for name, key in (("log_px", "log_px"), ("iwae64", "small"), ("elbo", "elbo"))
    }
    return result, per_image


# -- gradient signal-to-noise ratios (Rainforth et al. 2018, section 3) --------------------


def gradient_snr(
    model: LatentVariableModel, x: Tensor, objective, reps: int = 1000, seed: int = 0, bar=None
) -> dict[str, float]:
    """Mean signal-to-noise ratio of the gradient estimates of ``objective`` on the fixed
    batch ``x``.

    Each of ``reps`` repeats draws fresh samples and takes Delta = the gradient of the
    batch-mean objective (as :meth:`iwae.bounds.Objective.backward` computes it). For each
    scalar parameter

        SNR = |E[Delta]| / std[Delta]   (Rainforth et al. 2018, eq. 9),

    estimated over the repeats; returned is its mean over the parameters of each network,
    ``{"encoder": ..., "decoder": ...}``. Parameters whose estimate never varies (std 0)
    are left out of the mean. Each repeat needs its own backward pass, so repeats run one
    after another; moments are accumulated in float64, shifted by the first repeat.
    """
    if reps < 2:
        raise IwaeError(f"the SNR needs at least 2 repeats, got {reps}")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    nets = {"encoder": model.encoder_parameters(), "decoder": model.decoder_parameters()}
    shift: dict[str, Tensor] = {}
    total: dict[str, Tensor] = {}
    total_sq: dict[str, Tensor] = {}
    for r in range(reps):
        model.zero_grad(set_to_none=True)
        objective.backward(
            objective.log_weights(model, x, generator), nets["encoder"], nets["decoder"]
        )
        for name, params in nets.items():
            g = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in params
                ]
            ).double()
            if r == 0:
                shift[name], total[name], total_sq[name] = (
                    g,
                    torch.zeros_like(g),
                    torch.zeros_like(g),
                )
            d = g - shift[name]
            total[name] += d
            total_sq[name] += d * d
        if bar is not None:
            bar.update(1)
    model.zero_grad(set_to_none=True)
    result = {}
    for name in nets:
        mean_d = total[name] / reps
        std = ((total_sq[name] - reps * mean_d.square()) / (reps - 1)).clamp_min(0.0).sqrt()
        varies = std > 0
        result[name] = ((shift[name] + mean_d).abs()[varies] / std[varies]).mean().item()
    return result


def loglog_slope(ks, values) -> float | None:
    """Least-squares slope of log(value) against log(K); None with fewer than two usable
    points."""
    pts = [
        (math.log(k), math.log(v))
        for k, v in zip(ks, values)
        if v is not None and math.isfinite(v) and v > 0
    ]
    if len({p[0] for p in pts}) < 2:
        return None
    lk, lv = np.array(pts).T
    return float(np.polyfit(lk, lv, 1)[0])


def gradient_snr_curve(
    model: LatentVariableModel,
    x: Tensor,
    ks,
    estimator: str = "reparam",
    reps: int = 1000,
    seed: int = 0,
    bar=None,
) -> dict:
    """Encoder and decoder SNR (:func:`gradient_snr`) of the IWAE_K objective for each K in
    ``ks``: ``{"estimator", "k", "encoder", "decoder", "encoder_slope", "decoder_slope"}``,
    the lists in the order of ``ks`` and the slopes fitted on log-log axes
    (:func:`loglog_slope`).

    Every K starts from the same ``seed``, so two estimators see the same samples.
    """
    result = {"estimator": estimator, "k": [int(k) for k in ks], "encoder": [], "decoder": []}
    for k in result["k"]:
        snr = gradient_snr(
            model, x, Objective("iwae", k=k, estimator=estimator), reps=reps, seed=seed, bar=bar
        )
        result["encoder"].append(snr["encoder"])
        result["decoder"].append(snr["decoder"])
    result["encoder_slope"] = loglog_slope(result["k"], result["encoder"])
    result["decoder_slope"] = loglog_slope(result["k"], result["decoder"])
    return result


# -- annealed importance sampling (iwae evaluate --method ais) ------------------------------


def _reference_log_px(model, x, reference, k, seed, max_rows, progress) -> Tensor:
    """The per-image L_k that AIS is set beside: ``reference`` (checked), or computed."""
    if reference is not None:
        if reference.shape != (x.shape[0],):
            raise IwaeError(
                f"reference L_k must hold one value per image ({x.shape[0]}), "
                f"got shape {tuple(reference.shape)}"
            )
        return reference
    was_training = model.training
    model.eval()
    reduced = log_weight_reductions(
        model, x, k, k_small=1, seed=seed, max_rows=max_rows, progress=progress
    )
    model.train(was_training)
    return reduced["log_px"]


def evaluate_ais(
    model: LatentVariableModel,
    x: Tensor,
    steps: int,
    chains: int,
    leapfrog_steps: int,
    init: str = "q",
    seed: int = 0,
    reference: Tensor | None = None,
    k: int = 5000,
    max_rows: int = MAX_ROWS,
    progress: bool = False,
) -> tuple[dict, dict[str, Tensor]]:
    """log p(x) by annealed importance sampling (:func:`iwae.ais.forward_ais`) for binarized
    images ``x`` [N, D], beside L_k on the same images: ``reference`` [N], the per-image L_k
    of an earlier evaluation, or, where None, L_k computed here (seed ``seed``).

    Returns the keys of ``iwae evaluate --method ais --json`` and the per-image values
    (``log_px_ais``, ``acceptance``, ``log_px_iwae``; float32 [N]):

    - ``log_px_ais``, ``log_px_ais_stderr``: mean over images of the AIS estimate (log-mean-exp
      over chains, a stochastic lower bound on log p(x)) and its standard error;
    - ``ais_acceptance``: mean acceptance probability of the HMC transitions;
    - ``log_px_iwae``, ``iwae_k``: mean L_k on the same images and k;
    - ``ais_gap``, ``ais_gap_stderr``: mean of log_px_ais - L_k per image and its paired
      standard error;
    - ``ais_steps``, ``chains``, ``hmc_leapfrog``, ``ais_init``, ``n_test``, ``ais_seconds``;
    - for 8-bit data (logistic-256), ``bits_per_dim``: -log_px_ais / (D ln 2).

    On the CPU the memory of freed tensors is kept for reuse (:mod:`iwae.memory`).
    """
    _check_test_images(model, x)
    reuse_freed_memory(x.device)
    reference = _reference_log_px(model, x, reference, k, seed, max_rows, progress)
    started = time.perf_counter()
    r = forward_ais(
        model,
        x,
        steps,
        chains,
        leapfrog_steps,
        init=init,
        seed=seed,
        max_rows=max_rows,
        progress=progress,
    )
    seconds = time.perf_counter() - started
    ais, ref = r["log_px"].double().cpu(), reference.double().cpu()
    n = x.shape[0]
    acceptance = r["acceptance"].double().nanmean().item()
    result = {
        "method": "ais",
        "log_px_ais": ais.mean().item(),
        "log_px_ais_stderr": _standard_error(ais),
        "ais_acceptance": None if math.isnan(acceptance) else acceptance,
        "log_px_iwae": ref.mean().item(),
        "iwae_k": k,
        "ais_gap": (ais - ref).mean().item(),
        "ais_gap_stderr": _standard_error(ais - ref),
        "ais_steps": steps,
        "chains": chains,
        "hmc_leapfrog": leapfrog_steps,
        "ais_init": init,
        "n_test": n,
        "ais_seconds": seconds,
    }
    result.update(eight_bit_record(model, -result["log_px_ais"], x.shape[1]))
    per_image = {
        "log_px_ais": ais.float(),
        "acceptance": r["acceptance"].float().cpu(),
        "log_px_iwae": ref.float(),
    }
    return result, per_image
