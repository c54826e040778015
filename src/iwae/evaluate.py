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

import torch
from torch import Tensor

from iwae.model import VAE

MAX_ROWS = 32768


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(size, n - start)


@torch.inference_mode()
def log_weight_reductions(
    model: VAE,
    x: Tensor,
    k: int,
    k_small: int = 64,
    seed: int = 0,
    max_rows: int = MAX_ROWS,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Per-example L_k, L_{k_small} (first k_small samples) and mean log-weight, each [N].

    Deterministic given ``seed`` (and ``max_rows``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    k_small = min(k_small, k)
    samples_per_chunk = min(k, max_rows)
    examples_per_chunk = max(1, max_rows // samples_per_chunk)
    n = x.shape[0]
    out = {name: torch.empty(n, device=x.device) for name in ("log_px", "small", "elbo")}
    from tqdm.auto import tqdm

    with tqdm(total=n, disable=not progress, desc=f"L_{k}", unit="ex", dynamic_ncols=True) as bar:
        for e0, ne in _chunks(n, examples_per_chunk):
            xb = x[e0 : e0 + ne]
            lse = torch.full((ne,), -math.inf, device=x.device)
            lse_small = torch.full((ne,), -math.inf, device=x.device)
            total = torch.zeros(ne, device=x.device)
            for s0, ns in _chunks(k, samples_per_chunk):
                log_w = model.log_weights(xb, ns, generator=generator)
                lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
                if s0 < k_small:
                    lse_small = torch.logaddexp(lse_small, torch.logsumexp(log_w[: k_small - s0], 0))
                total += log_w.sum(0)
            out["log_px"][e0 : e0 + ne] = lse - math.log(k)
            out["small"][e0 : e0 + ne] = lse_small - math.log(k_small)
            out["elbo"][e0 : e0 + ne] = total / k
            bar.update(ne)
    return out


def iwae_bound(model: VAE, x: Tensor, k: int, seed: int = 0) -> float:
    """Mean over examples of the IWAE bound L_k."""
    was_training = model.training
    model.eval()
    value = log_weight_reductions(model, x, k, k_small=1, seed=seed)["log_px"].mean().item()
    model.train(was_training)
    return value


@torch.inference_mode()
def unit_activity(model: VAE, x: Tensor, n_samples: int = 100, seed: int = 0, batch_size: int = 1000) -> list[Tensor]:
    """Per-unit activity A_u = Cov_x(E_{q(h|x)}[u]) for each stochastic layer (Burda et al. sec. 5.2).

    E_q[h_1 | x] is the encoder mean; for layer l > 1, E_q[h_l | x] =
    E_{h_{l-1} ~ q}[mean_l(h_{l-1})] is estimated with ``n_samples`` samples of h_{l-1}.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)
    means: list[list[Tensor]] = [[] for _ in range(model.n_layers)]
    for e0, ne in _chunks(x.shape[0], batch_size):
        u = x[e0 : e0 + ne]
        for l, layer in enumerate(model.encoder):
            mean, log_std = layer(u)
            means[l].append(mean if l == 0 else mean.mean(0))
            if l + 1 < model.n_layers:
                u, _ = layer.rsample(mean, log_std, n_samples if l == 0 else None, generator)
    return [torch.cat(m).var(0, correction=0) for m in means]


def active_units(model: VAE, x: Tensor, threshold: float = 0.01, **kwargs) -> list[int]:
    """Number of units with activity Cov_x(E_q[u]) > threshold, one count per layer."""
    return [int((a > threshold).sum()) for a in unit_activity(model, x, **kwargs)]


def evaluate(
    model: VAE,
    x: Tensor,
    k: int = 5000,
    seed: int = 0,
    max_rows: int = MAX_ROWS,
    progress: bool = False,
) -> dict:
    """All test metrics for binarized test images ``x`` [N, D]; the keys of ``iwae evaluate --json``."""
    was_training = model.training
    model.eval()
    r = log_weight_reductions(model, x, k, k_small=64, seed=seed, max_rows=max_rows, progress=progress)
    n = x.shape[0]
    log_px = r["log_px"].double()
    stderr = log_px.std().item() / math.sqrt(n) if n > 1 else float("nan")
    result = {
        "nll": -log_px.mean().item(),
        "nll_stderr": stderr,
        "iwae64": r["small"].double().mean().item(),
        "log_px": log_px.mean().item(),
        "neg_kl_q_p": (r["small"].double() - log_px).mean().item(),
        "elbo": r["elbo"].double().mean().item(),
        "active_units": active_units(model, x, seed=seed),
        "n_test": n,
        "k": k,
    }
    model.train(was_training)
    return result
