"""Likelihoods p(x | h_1): the part of a model that says how an image is scored and drawn.

A likelihood turns the decoder's output, its *parameters* (e.g. Bernoulli logits, shape
[..., D] for D pixels), into

- ``log_prob(params, x)``: log p(x | h_1) summed over the D dimensions, shape [...];
  parameters of shape [..., k, B, D] score examples x of shape [..., B, D] (the sample
  dimension is broadcast);
- ``sample(params, generator)``: a draw x ~ p(x | h_1), shape [..., D];
- ``mean(params)``: E[x | h_1], shape [..., D] (what sample grids show).

Every value is computed in log space from the parameters as the decoder outputs them
(never ``log(sigmoid(.))``). :data:`LIKELIHOODS` maps the names of ``--likelihood`` to
their classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iwae.errors import IwaeError


class Likelihood(nn.Module):
    """The interface of a likelihood (see the module docstring). ``name`` is what
    ``config.json`` records; ``params_per_dim`` how many decoder outputs each data
    dimension takes (the decoder's last layer has ``params_per_dim * D`` outputs). A
    likelihood is a module: one with parameters of its own (a learned Gaussian scale)
    trains them with the decoder."""

    name: str = ""
    params_per_dim: int = 1

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        raise NotImplementedError

    def check_data(self, x: Tensor, what: str) -> None:
        """Raise :class:`IwaeError` if ``x`` lies outside this likelihood's support."""

    def initial_bias(self, pixel_mean: Tensor) -> Tensor:
        """The decoder's output bias at initialization, [params_per_dim * D], from the
        training images' mean ``pixel_mean`` [D]: parameters whose E[x] is the pixel mean,
        in the likelihood's own parameterization (scales, where the decoder gives them,
        log-scale 0)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _broadcast_x(params: Tensor, x: Tensor) -> Tensor:
    """Examples x [..., B, D] beside parameters [..., k, B, D]: x gets the sample dimension."""
    return x.unsqueeze(-3) if params.dim() > x.dim() else x


class Bernoulli(Likelihood):
    """Binary pixels: p(x | h_1) = prod_d sigmoid(l_d)^x_d (1 - sigmoid(l_d))^(1 - x_d) with
    logits l, so log p(x | h_1) = sum_d x_d l_d - softplus(l_d) (Burda et al. 2016)."""

    name = "bernoulli"

    def log_prob(self, logits: Tensor, x: Tensor) -> Tensor:
        return bernoulli_log_prob(logits, _broadcast_x(logits, x))

    def sample(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(logits), generator=generator)

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def check_data(self, x: Tensor, what: str) -> None:
        if not bool(((x == 0) | (x == 1)).all()):
            raise IwaeError(f"{what}: the Bernoulli likelihood needs binary values (0 or 1)")

    def initial_bias(self, pixel_mean: Tensor) -> Tensor:
        """The logit of the pixel mean clipped to 0.001..0.999 (Burda et al.'s code)."""
        return torch.logit(_mean_vector(pixel_mean).clamp(0.001, 0.999))


def _mean_vector(pixel_mean: Tensor) -> Tensor:
    return torch.as_tensor(pixel_mean, dtype=torch.float32).reshape(-1)


def bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over pixels, from logits:
    x*l - softplus(l) = -softplus(-l) for x = 1 and -softplus(l) for x = 0."""
    return x.mul(logits).sub_(F.softplus(logits)).sum(-1)


LOG_2PI = math.log(2 * math.pi)


def _log_c(logits: Tensor) -> Tensor:
    """log C(lambda) of the continuous Bernoulli, with logits l = logit(lambda):
    C = l / tanh(l / 2) (= 2 artanh(1 - 2 lambda) / (1 - 2 lambda)), computed as
    log|l| - log(-expm1(-|l|)) + log1p(exp(-|l|)), and by its series
    log 2 + l^2/12 - 7 l^4/1440 for |l| < 1e-3, where the first form would divide 0 by 0."""
    a = logits.abs()
    safe = a.clamp_min(1e-3)
    exact = safe.log() - torch.log(-torch.expm1(-safe)) + torch.log1p(torch.exp(-safe))
    series = math.log(2.0) + a.square() / 12 - 7 * a.pow(4) / 1440
    return torch.where(a < 1e-3, series, exact)


class ContinuousBernoulli(Likelihood):
    """Grey values in [0, 1] used as they are (Loaiza-Ganem & Cunningham 2019):
    p(x | lambda) = C(lambda) lambda^x (1 - lambda)^(1 - x) on [0, 1], per dimension, with
    logits l = logit(lambda), so log p = x l - softplus(l) + log C(l) (:func:`_log_c`:
    the exact normalizing constant, stable near lambda = 1/2). As a density over [0, 1] it
    is the exponential family p(x) = l exp(l x) / (exp(l) - 1)."""

    name = "continuous-bernoulli"

    def log_prob(self, logits: Tensor, x: Tensor) -> Tensor:
        x = _broadcast_x(logits, x)
        return (x * logits - F.softplus(logits) + _log_c(logits)).sum(-1)

    def sample(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """By the inverse CDF: x = log1p(u expm1(l)) / l for u ~ U(0, 1), x = u at l = 0."""
        u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device, generator=generator)
        l = logits.clamp(-60.0, 60.0)
        small = l.abs() < 1e-4
        l_safe = torch.where(small, torch.ones_like(l), l)
        x = torch.log1p(u * torch.expm1(l_safe)) / l_safe
        return torch.where(small, u, x).clamp(0.0, 1.0)

    def mean(self, logits: Tensor) -> Tensor:
        """E[x] = 1 / (1 - exp(-l)) - 1 / l (1/2 + l/12 near l = 0)."""
        small = logits.abs() < 1e-3
        l_safe = torch.where(small, torch.ones_like(logits), logits)
        exact = 1.0 / (-torch.expm1(-l_safe)) - 1.0 / l_safe
        return torch.where(small, 0.5 + logits / 12, exact)

    def check_data(self, x: Tensor, what: str) -> None:
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise IwaeError(f"{what}: the continuous Bernoulli needs values in [0, 1]")

    def initial_bias(self, pixel_mean: Tensor) -> Tensor:
        """The logits whose mean (:meth:`mean`, increasing in l) is the pixel mean clipped
        to 0.01..0.99 (|l| <= 100), found by bisection."""
        target = _mean_vector(pixel_mean).double().clamp(0.01, 0.99)
        lo, hi = torch.full_like(target, -101.0), torch.full_like(target, 101.0)
        for _ in range(60):
            mid = (lo + hi) / 2
            below = self.mean(mid) < target
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return ((lo + hi) / 2).float()


#: The floor of a Gaussian's or a logistic's log-scale: log sigma = floor + softplus(raw -
#: floor) stays above log(1e-3) and follows raw above it (sigma >= 0.001 on data in [0, 1]).
LOG_SCALE_FLOOR = math.log(1e-3)


def floored_log_scale(raw: Tensor) -> Tensor:
    """A log-scale kept above :data:`LOG_SCALE_FLOOR`, smoothly (gradients never vanish)."""
    return LOG_SCALE_FLOOR + F.softplus(raw - LOG_SCALE_FLOOR)


class Gaussian(Likelihood):
    """Real-valued data: p(x | h_1) = prod_d N(x_d; mu_d, sigma_d^2), so
    log p = -sum_d [ (x_d - mu_d)^2 / (2 sigma_d^2) + log sigma_d + log(2 pi) / 2 ]
    (with the -D/2 log 2 pi term). The decoder gives mu and, with ``scale="decoder"``, a raw
    log sigma per dimension ([..., 2D]: mu first); with ``scale="learned"`` it gives mu only
    ([..., D]) and log sigma is one learned parameter per dimension (``dim`` of them).
    Either way log sigma is floored at :data:`LOG_SCALE_FLOOR` (:func:`floored_log_scale`)."""

    name = "gaussian"

    def __init__(self, scale: str = "decoder", dim: int | None = None):
        super().__init__()
        if scale not in ("decoder", "learned"):
            raise IwaeError(f"the Gaussian's scale is decoder or learned, got {scale!r}")
        if scale == "learned" and not (isinstance(dim, int) and dim >= 1):
            raise IwaeError("a Gaussian with a learned scale needs its number of dimensions")
        self.scale = scale
        self.params_per_dim = 2 if scale == "decoder" else 1
        if scale == "learned":
            self.raw_log_scale = nn.Parameter(torch.zeros(dim))

    def _mean_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        if self.scale == "decoder":
            mean, raw = params.chunk(2, -1)
        else:
            mean, raw = params, self.raw_log_scale.expand_as(params)
        return mean, floored_log_scale(raw)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        mean, log_scale = self._mean_log_scale(params)
        z = (_broadcast_x(mean, x) - mean) * torch.exp(-log_scale)
        return (-0.5 * z.square() - log_scale - 0.5 * LOG_2PI).sum(-1)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, log_scale = self._mean_log_scale(params)
        eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
        return mean + log_scale.exp() * eps

    def mean(self, params: Tensor) -> Tensor:
        return self._mean_log_scale(params)[0]

    def initial_bias(self, pixel_mean: Tensor) -> Tensor:
        """mu = the pixel mean, and (scale from the decoder) raw log sigma 0."""
        mu = _mean_vector(pixel_mean)
        return mu if self.scale == "learned" else torch.cat([mu, torch.zeros_like(mu)])

    def __repr__(self) -> str:
        return f"Gaussian(scale={self.scale!r})"


#: levels of 8-bit data; data given to the model as v / 255 for v = 0..255
LEVELS = 256


class Logistic256(Likelihood):
    """8-bit data, a discretized logistic per dimension with edge bins (Salimans et al.
    2017, PixelCNN++). A level v in 0..255 is given to the model as x = v / 255 and scored
    at c = 2x - 1 in [-1, 1] with bins of half-width 1/255:

        P(v) = sigma((c + 1/255 - mu) / s) - sigma((c - 1/255 - mu) / s),

    where the lowest level takes the whole mass below its upper edge (sigma(.) of the upper
    edge) and the highest the mass above its lower edge (1 - sigma(.)). The decoder gives
    mu and a raw log s per dimension ([..., 2D]: mu first; log s floored at
    :data:`LOG_SCALE_FLOOR`). The interior difference is computed exactly in log space,
    log(sigma(a) - sigma(b)) = log sigma(a) + log sigma(-b) + log(1 - exp(b - a)). The
    mass sums to 1 over the 256 levels, so -log P in nats / (D log 2) is bits per dimension.
    """

    name = "logistic-256"
    params_per_dim = 2

    def _mu_log_s(self, params: Tensor) -> tuple[Tensor, Tensor]:
        mu, raw = params.chunk(2, -1)
        return mu, floored_log_scale(raw)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        mu, log_s = self._mu_log_s(params)
        c = 2.0 * _broadcast_x(mu, x) - 1.0
        inv_s = torch.exp(-log_s)
        a = (c + 1.0 / 255 - mu) * inv_s  # upper edge
        b = (c - 1.0 / 255 - mu) * inv_s  # lower edge
        log_cdf_a = -F.softplus(-a)
        log_sf_b = -F.softplus(b)
        interior = log_cdf_a + log_sf_b + torch.log(-torch.expm1(-(2.0 / 255) * inv_s))
        log_p = torch.where(c < -0.999, log_cdf_a, torch.where(c > 0.999, log_sf_b, interior))
        return log_p.sum(-1)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mu, log_s = self._mu_log_s(params)
        u = torch.rand(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
        u = u.clamp(1e-6, 1 - 1e-6)
        c = (mu + log_s.exp() * (torch.log(u) - torch.log1p(-u))).clamp(-1.0, 1.0)
        return torch.round((c + 1.0) / 2.0 * 255) / 255

    def mean(self, params: Tensor) -> Tensor:
        """The location mu mapped to [0, 1] (what sample grids show)."""
        return ((self._mu_log_s(params)[0].clamp(-1.0, 1.0)) + 1.0) / 2.0

    def initial_bias(self, pixel_mean: Tensor) -> Tensor:
        """mu = 2 m - 1 for the pixel mean m (the location in [-1, 1]), raw log s 0."""
        mu = 2.0 * _mean_vector(pixel_mean) - 1.0
        return torch.cat([mu, torch.zeros_like(mu)])

    def check_data(self, x: Tensor, what: str) -> None:
        levels = x * 255
        if not bool(((x >= 0) & (x <= 1) & ((levels - levels.round()).abs() < 1e-3)).all()):
            raise IwaeError(f"{what}: logistic-256 needs the 256 levels of 8-bit data (v / 255)")


def bits_per_dim(nats: float, dims: int) -> float:
    """A negative log-likelihood in nats per example as bits per dimension: nats / (D ln 2)."""
    return nats / (dims * math.log(2.0))


#: the likelihoods by their ``--likelihood`` names
LIKELIHOODS: dict[str, type[Likelihood]] = {
    c.name: c for c in (Bernoulli, ContinuousBernoulli, Gaussian, Logistic256)
}


#: how a Gaussian likelihood's scale is given (``--gaussian-scale``): by the decoder, one
#: log sigma per dimension and image, or learned, one log sigma per dimension for all images
GAUSSIAN_SCALES = ("decoder", "learned")


def make_likelihood(name: str, gaussian_scale: str = "decoder", dim: int | None = None):
    """The likelihood ``name`` of a model of ``dim`` data dimensions: for ``gaussian``, with
    its scale ``gaussian_scale`` (:data:`GAUSSIAN_SCALES`; ignored by the others)."""
    if name == Gaussian.name:
        return Gaussian(gaussian_scale, dim)
    return get_likelihood(name)


def get_likelihood(name: str | Likelihood) -> Likelihood:
    """The likelihood called ``name`` (a :class:`Likelihood` is returned as it is)."""
    if isinstance(name, Likelihood):
        return name
    if name not in LIKELIHOODS:
        raise IwaeError(f"unknown likelihood {name!r}: choose one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name]()
