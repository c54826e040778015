"""Bounds on log p(x) and the objectives trained with them.

Every bound is a reduction of one tensor of log-weights

    log w[s, b] = log p(x_b, h_s) - log q(h_s | x_b),   shape [S, B],

made by :meth:`iwae.model.VAE.log_weights`. For the grouped objectives of Rainforth
et al. (2018) the S = M*K samples are read as M groups of K: group m holds samples
m*K .. m*K + K - 1 (``log_w.view(M, K, B)``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from iwae.errors import IwaeError

OBJECTIVES = ("vae", "iwae", "miwae", "ciwae", "piwae")


def elbo(log_w: Tensor) -> Tensor:
    """VAE bound (ELBO) with S samples:  L_VAE = (1/S) sum_s log w_s.   [S, B] -> [B]"""
    return log_w.mean(0)


def iwae(log_w: Tensor) -> Tensor:
    """IWAE bound (Burda et al. eq. 8):  L_S = log (1/S) sum_s w_s
    = logsumexp_s(log w_s) - log S.   [S, B] -> [B]"""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def miwae(log_w: Tensor, m: int) -> Tensor:
    """MIWAE(M, K) (Rainforth et al. eq. 5): the mean over M groups of IWAE_K,
    (1/M) sum_m log (1/K) sum_k w_{m,k}.   [M*K, B] -> [B]"""
    S, B = log_w.shape
    if m < 1 or S % m:
        raise IwaeError(f"cannot split {S} samples into {m} equal groups")
    k = S // m
    return (torch.logsumexp(log_w.reshape(m, k, B), 1) - math.log(k)).mean(0)


def ciwae(log_w: Tensor, beta: float) -> Tensor:
    """CIWAE(beta) (Rainforth et al. eq. 6) on the same samples:
    beta * L_VAE + (1 - beta) * L_IWAE.   [S, B] -> [B]"""
    return beta * elbo(log_w) + (1.0 - beta) * iwae(log_w)


@dataclass(frozen=True)
class Objective:
    """A training objective: which bound, with ``k`` samples in each of ``m`` groups.

    - vae:   L_VAE over k samples (m = 1)
    - iwae:  L_k (m = 1)
    - miwae: MIWAE(m, k)
    - ciwae: CIWAE(beta) over k samples (m = 1)
    - piwae: PIWAE(m, k): decoder parameters theta ascend IWAE over all m*k samples,
      encoder parameters phi ascend MIWAE(m, k), each receiving only its own gradient.
    """

    name: str = "iwae"
    k: int = 1
    m: int = 1
    beta: float = 0.5

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise IwaeError(f"unknown objective {self.name!r}: choose one of {', '.join(OBJECTIVES)}")
        if not isinstance(self.k, int) or self.k < 1:
            raise IwaeError(f"k must be an integer >= 1, got {self.k!r}")
        if not isinstance(self.m, int) or self.m < 1:
            raise IwaeError(f"m must be an integer >= 1, got {self.m!r}")
        if self.m > 1 and self.name not in ("miwae", "piwae"):
            raise IwaeError(f"-m (groups) applies to miwae and piwae only; {self.name} uses k samples")
        if not (0.0 <= self.beta <= 1.0) or math.isnan(self.beta):
            raise IwaeError(f"beta must lie in [0, 1], got {self.beta!r}")

    @property
    def samples(self) -> int:
        """Importance samples drawn per example: M*K."""
        return self.m * self.k

    def __str__(self) -> str:
        if self.name in ("miwae", "piwae"):
            return f"{self.name.upper()}({self.m},{self.k})"
        if self.name == "ciwae":
            return f"CIWAE(beta={self.beta:g}, k={self.k})"
        return f"{self.name.upper()}(k={self.k})"

    def to_dict(self) -> dict:
        return asdict(self)

    def bound(self, log_w: Tensor) -> Tensor:
        """The objective's bound per example, [S, B] -> [B]; for PIWAE the decoder's
        bound IWAE over all M*K samples (the encoder's is MIWAE(M, K))."""
        if self.name == "vae":
            return elbo(log_w)
        if self.name in ("iwae", "piwae"):
            return iwae(log_w)
        if self.name == "miwae":
            return miwae(log_w, self.m)
        return ciwae(log_w, self.beta)

    def backward(self, log_w: Tensor, encoder_params, decoder_params) -> Tensor:
        """Accumulate into ``.grad`` the gradient of minus the batch-mean objective and
        return the batch-mean bound (detached) for logging.

        All objectives but PIWAE are one bound differentiated with respect to all
        parameters. PIWAE routes two bounds to two parameter sets:
        grad_theta = -grad_theta mean_b IWAE_{M*K}, grad_phi = -grad_phi mean_b MIWAE(M, K).
        """
        value = self.bound(log_w).mean()
        if self.name != "piwae":
            (-value).backward()
            return value.detach()
        encoder_params, decoder_params = list(encoder_params), list(decoder_params)
        enc_loss = -miwae(log_w, self.m).mean()
        enc_grads = torch.autograd.grad(enc_loss, encoder_params, retain_graph=True)
        dec_grads = torch.autograd.grad(-value, decoder_params)
        for p, g in zip(encoder_params + decoder_params, enc_grads + dec_grads):
            p.grad = g if p.grad is None else p.grad + g
        return value.detach()
