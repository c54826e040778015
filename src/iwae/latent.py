"""Latent variable models as the engine sees them: the protocol, and two ways to build one.

A model with L Gaussian stochastic layers h_1..h_L has

    q(h_1..h_L | x) = q(h_1 | x) q(h_2 | h_1) ... q(h_L | h_{L-1})
    p(x, h_1..h_L)  = p(h_L) p(h_{L-1} | h_L) ... p(h_1 | h_2) p(x | h_1)

with p(h_L) = N(0, I), every other conditional a diagonal Gaussian N(mean, diag sigma^2)
given by a network as (mean, log sigma), and p(x | h_1) a :class:`iwae.likelihoods.Likelihood`
whose parameters a decoder network gives. Samples are stacked on a leading dimension: k
samples for a batch of B examples have shape [k, B, d], log-densities [k, B]. Examples
are flat vectors x [B, D] (images flattened row by row).

:class:`LatentVariableModel` writes down what training, checkpoints, evaluation (L_k,
IWAE-64, log p-hat, -KL, ELBO, active units), AIS, BDMC and the SNR need from a model.
:class:`GaussianLatentModel` implements all of it from three parts (the q layers, the p
layers, the likelihood's network); :class:`iwae.model.VAE` (Burda et al.'s MLPs) and
:class:`ModuleVAE` (any encoder and decoder ``nn.Module``) are built on it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from iwae.errors import IwaeError
from iwae.likelihoods import Bernoulli, Likelihood, get_likelihood

LOG_2PI = math.log(2 * math.pi)

#: A source of standard normal noise: ``noise(shape, dtype, device)`` -> Tensor. A model
#: draws from ``torch.randn`` with a generator unless it is given one of these explicitly.
Noise = Callable[[tuple, torch.dtype, torch.device], Tensor]


@runtime_checkable
class LatentVariableModel(Protocol):
    """What the engine needs from a model (shapes: k samples, B examples, D pixels, d_l units).

    Training (:mod:`iwae.train`): ``log_weights``, ``encoder_parameters``,
    ``decoder_parameters`` (the gradient estimators route the two sets differently), and
    ``state_dict``/``load_state_dict`` (checkpoints; any ``nn.Module`` has them).
    Evaluation (:mod:`iwae.evaluate`): ``log_weights``, and ``q_params`` for active units.
    AIS and BDMC (:mod:`iwae.ais`): ``latent_sizes``, ``sample_q``, ``log_q``, ``log_prior``,
    ``log_likelihood``, ``log_joint``, ``sample_prior``, ``sample_x``.
    Sample grids: ``sample_images``.
    """

    #: units of each stochastic layer, h_1 (next to x) first
    latent_sizes: tuple[int, ...]
    likelihood: Likelihood

    def encoder_parameters(self) -> list[nn.Parameter]: ...

    def decoder_parameters(self) -> list[nn.Parameter]: ...

    def log_weights(
        self, x: Tensor, k: int, generator=None, stop_q: bool = False, noise: Noise | None = None
    ) -> Tensor:
        """log p(x, h_i) - log q(h_i | x) for k samples h_i ~ q(. | x): [k, B]; with ``stop_q``
        the same values, with q's parameters held fixed inside log q (STL, DReG)."""
        ...

    def q_params(self, l: int, u: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log sigma) of q(h_{l+1} | u), u = x for l = 0, else a sample of h_l."""
        ...

    def sample_q(self, x: Tensor, k: int, generator=None, noise=None) -> list[Tensor]: ...

    def log_q(self, hs: list[Tensor], x: Tensor) -> Tensor: ...

    def log_prior(self, hs: list[Tensor]) -> Tensor: ...

    def log_likelihood(self, x: Tensor, h1: Tensor) -> Tensor: ...

    def log_joint(self, x: Tensor, hs: list[Tensor]) -> Tensor: ...

    def sample_prior(self, n: int, generator=None) -> list[Tensor]: ...

    def sample_x(self, h1: Tensor, generator=None) -> Tensor: ...

    def sample_images(self, n: int, generator=None) -> Tensor: ...


# -- diagonal Gaussians -----------------------------------------------------------------------


def gaussian_log_prob(h: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(h; mean, diag exp(log_std)^2) summed over the last dimension; parameters of
    shape [..., B, d] are shared by samples h of shape [..., k, B, d]."""
    if mean.dim() < h.dim():
        mean, log_std = mean.unsqueeze(-3), log_std.unsqueeze(-3)
    z = (h - mean) * torch.exp(-log_std)
    return -0.5 * z.square().sum(-1) - log_std.sum(-1) - 0.5 * LOG_2PI * h.shape[-1]


def standard_normal_log_prob(h: Tensor) -> Tensor:
    """log N(h; 0, I) summed over the last dimension."""
    return -0.5 * h.square().sum(-1) - 0.5 * LOG_2PI * h.shape[-1]


def gaussian_rsample(
    mean: Tensor,
    log_std: Tensor,
    k: int | None = None,
    generator=None,
    noise: Noise | None = None,
) -> tuple[Tensor, Tensor]:
    """Reparameterized sample h = mean + sigma * eps and its log-density.

    With ``k`` the parameters (shape [..., B, d]) are shared by k samples of shape
    [..., k, B, d] (the sample dimension goes just before the batch dimension, after a
    model dimension if there is one). eps ~ N(0, I) comes from ``noise(shape, dtype,
    device)`` when given (e.g. :class:`iwae.model.BatchShard`), else from ``torch.randn``
    with ``generator``. The log-density is computed from eps, which is the same value and
    the same gradient as log N(h; mean, sigma) since (h - mean)/sigma = eps.
    """
    if k is not None:
        mean, log_std = mean.unsqueeze(-3), log_std.unsqueeze(-3)
    shape = mean.shape if k is None else (*mean.shape[:-3], k, *mean.shape[-2:])
    if noise is not None:
        eps = noise(shape, mean.dtype, mean.device)
    else:
        eps = torch.randn(shape, dtype=mean.dtype, device=mean.device, generator=generator)
    h = mean + log_std.exp() * eps
    log_prob = -0.5 * eps.square().sum(-1) - log_std.sum(-1) - 0.5 * LOG_2PI * mean.shape[-1]
    return h, log_prob


_BERNOULLI = Bernoulli()


# -- the protocol from three parts ------------------------------------------------------------


class GaussianLatentModel(nn.Module):
    """:class:`LatentVariableModel` implemented from three parts a subclass provides:

    - ``q_layers()``: L modules, module l mapping u (x for l = 0, else h_l) to the
      (mean, log sigma) of q(h_{l+1} | u);
    - ``p_layers()``: L - 1 modules, module l - 1 mapping h_{l+1} to the (mean, log sigma)
      of p(h_l | h_{l+1}) (l = 1..L-1);
    - ``likelihood_net``: the module mapping h_1 to the likelihood's parameters, and
      ``likelihood`` (:class:`iwae.likelihoods.Likelihood`).

    The encoder's parameters are those of the q layers, the decoder's all others. Each
    module sees tensors with any leading dimensions ([B, .] or [k, B, .]).

    Every call of one of these networks goes through :meth:`call_network`: inside
    :meth:`network_precision` (a bf16 training step, :mod:`iwae.precision`) the networks
    compute under autocast and their outputs are cast back to float32, so that every
    log-density, log-weight and reduction computed from them is float32; outside it (and
    always in evaluation) they compute in their parameters' float32.
    """

    latent_sizes: tuple[int, ...]

    @property
    def likelihood(self) -> Likelihood:
        """p(x | h_1)'s likelihood: the module a subclass assigns to ``self.likelihood``
        (registered as a submodule, so a learned scale trains and is saved), else Bernoulli.
        (A property: a class attribute would hide the assigned submodule.)"""
        own = self._modules.get("likelihood")
        return _BERNOULLI if own is None else own

    #: the dtype the networks compute in under autocast (None: their own, float32); set
    #: only inside :meth:`network_precision`
    network_dtype: torch.dtype | None = None

    def q_layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def p_layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def likelihood_net(self) -> nn.Module:
        raise NotImplementedError

    @property
    def n_layers(self) -> int:
        return len(self.latent_sizes)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.q_layers() for p in layer.parameters()]

    def decoder_parameters(self) -> list[nn.Parameter]:
        encoder = {id(p) for p in self.encoder_parameters()}
        return [p for p in self.parameters() if id(p) not in encoder]

    # -- the precision of the networks ------------------------------------------------------

    @contextlib.contextmanager
    def network_precision(self, dtype: torch.dtype | None):
        """A context in which this model's networks compute under autocast to ``dtype``
        (``torch.bfloat16``; None: in float32, as outside it), their outputs cast back to
        float32 (:meth:`call_network`). Everything else (sampling, log-densities,
        log-weights, bounds, gradients of the float32 parameters) stays float32."""
        previous, self.network_dtype = self.network_dtype, dtype
        try:
            yield self
        finally:
            self.network_dtype = previous

    def call_network(self, network: Callable, *inputs: Tensor):
        """``network(*inputs)``: one network's forward pass (a module, or a function of one).
        Under :meth:`network_precision` it runs under autocast to :attr:`network_dtype` and
        its outputs (a tensor, or a tuple of them) come back as float32; otherwise it is the
        plain call."""
        dtype = self.network_dtype
        if dtype is None:
            return network(*inputs)
        with torch.autocast(inputs[0].device.type, dtype=dtype, cache_enabled=False):
            out = network(*inputs)
        if isinstance(out, (tuple, list)):
            return tuple(o.float() for o in out)
        return out.float()

    # -- the distributions, one method per term of the maths --------------------------------

    def q_params(self, l: int, u: Tensor) -> tuple[Tensor, Tensor]:
        return self.call_network(self.q_layers()[l], u)

    def sample_q(
        self, x: Tensor, k: int, generator=None, noise: Noise | None = None
    ) -> list[Tensor]:
        """k reparameterized samples h_1..h_L ~ q(. | x): a list of [k, B, d_l] tensors."""
        return self._sample_q(x, k, generator, noise)[0]

    def log_q(self, hs: list[Tensor], x: Tensor) -> Tensor:
        """log q(h_1..h_L | x), shape [k, B]."""
        total = 0.0
        for layer, u, h in zip(self.q_layers(), [x, *hs[:-1]], hs):
            total = total + gaussian_log_prob(h, *self.call_network(layer, u))
        return total

    def log_q_stopped(self, hs: list[Tensor], x: Tensor) -> Tensor:
        """log q_{stop(phi)}(h_1..h_L | x), shape [k, B]: every layer's density with its
        parameters detached, still a function of its sample h_l and of its input h_{l-1}
        (so for L > 1 the gradient reaches h_{l-1} through q(h_l | h_{l-1}) as well)."""
        total = 0.0
        for layer, u, h in zip(self.q_layers(), [x, *hs[:-1]], hs):
            fixed = {name: p.detach() for name, p in layer.named_parameters()}
            mean, log_std = self.call_network(
                lambda v, layer=layer, fixed=fixed: torch.func.functional_call(layer, fixed, (v,)),
                u,
            )
            total = total + gaussian_log_prob(h, mean, log_std)
        return total

    def log_prior(self, hs: list[Tensor]) -> Tensor:
        """log p(h_1..h_L) = log p(h_L) + sum_l log p(h_l | h_{l+1}), shape [k, B]."""
        total = standard_normal_log_prob(hs[-1])
        for l, layer in enumerate(self.p_layers(), start=1):
            total = total + gaussian_log_prob(hs[l - 1], *self.call_network(layer, hs[l]))
        return total

    def likelihood_params(self, h1: Tensor) -> Tensor:
        """The parameters of p(x | h_1) (Bernoulli: logits), shape h1.shape[:-1] + [...]."""
        return self.call_network(self.likelihood_net, h1)

    def log_likelihood(self, x: Tensor, h1: Tensor) -> Tensor:
        """log p(x | h_1), shape [k, B] for samples h1 [k, B, d_1] of examples x [B, D]."""
        return self.likelihood.log_prob(self.likelihood_params(h1), x)

    def log_joint(self, x: Tensor, hs: list[Tensor]) -> Tensor:
        """log p(x, h_1..h_L), shape [k, B]."""
        return self.log_prior(hs) + self.log_likelihood(x, hs[0])

    def log_weights(
        self, x: Tensor, k: int, generator=None, stop_q: bool = False, noise: Noise | None = None
    ) -> Tensor:
        """log w_i = log p(x, h_i) - log q(h_i | x) for k samples h_i ~ q(. | x): shape [k, B].

        Every bound in :mod:`iwae.bounds` is a reduction of this tensor.

        With ``stop_q`` the same samples give the same values, bit for bit, but log q is
        differentiated as :meth:`log_q_stopped`: q's parameters phi are held fixed inside
        log q and the encoder's gradient flows only through the samples h_i(eps, phi), as
        the STL and DReG estimators need (:mod:`iwae.bounds`).
        """
        hs, log_q = self._sample_q(x, k, generator, noise)
        if stop_q:
            stopped = self.log_q_stopped(hs, x)
            log_q = (
                stopped - stopped.detach() + log_q.detach()
            )  # value of log_q, gradient of stopped
        return self.log_joint(x, hs) - log_q

    def _sample_q(
        self, x: Tensor, k: int, generator=None, noise: Noise | None = None
    ) -> tuple[list[Tensor], Tensor]:
        hs: list[Tensor] = []
        log_q = 0.0
        u = x
        for l, layer in enumerate(self.q_layers()):
            mean, log_std = self.call_network(layer, u)
            h, lp = gaussian_rsample(mean, log_std, k if l == 0 else None, generator, noise)
            hs.append(h)
            log_q = log_q + lp
            u = h
        return hs, log_q

    # -- generation -------------------------------------------------------------------------

    def sample_prior(self, n: int, generator=None) -> list[Tensor]:
        """Ancestral samples h_1..h_L ~ p(h) for n draws: a list of [n, d_l] tensors."""
        p = next(self.parameters())
        h = torch.randn(
            (n, self.latent_sizes[-1]), dtype=p.dtype, device=p.device, generator=generator
        )
        hs = [h]
        for layer in reversed(list(self.p_layers())):
            h, _ = gaussian_rsample(*self.call_network(layer, h), generator=generator)
            hs.insert(0, h)
        return hs

    def sample_x(self, h1: Tensor, generator=None) -> Tensor:
        """x ~ p(x | h_1)."""
        return self.likelihood.sample(self.likelihood_params(h1), generator)

    def decode(self, h1: Tensor) -> Tensor:
        """E[x | h_1] (Bernoulli: the pixel probabilities sigmoid(logits))."""
        return self.likelihood.mean(self.likelihood_params(h1))

    @torch.no_grad()
    def sample_images(self, n: int, generator=None) -> Tensor:
        """E[x | h_1] of n draws h ~ p(h) from the prior, shape [n, D]."""
        return self.decode(self.sample_prior(n, generator)[0])


# -- any encoder and decoder ------------------------------------------------------------------


class _Flat(nn.Module):
    """A user's module applied to inputs with any leading dimensions: they are flattened
    into one batch dimension for the call and restored on every output."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, u: Tensor):
        lead = u.shape[:-1]
        out = self.module(u.reshape(-1, u.shape[-1]))
        if isinstance(out, (tuple, list)):
            return tuple(o.reshape(*lead, *o.shape[1:]) for o in out)
        return out.reshape(*lead, *out.shape[1:])


def _module_list(modules, what: str) -> list[nn.Module]:
    modules = list(modules) if isinstance(modules, (list, tuple, nn.ModuleList)) else [modules]
    for m in modules:
        if not isinstance(m, nn.Module):
            raise IwaeError(f"{what} must be torch.nn.Module objects, got {type(m).__name__}")
    return modules


class ModuleVAE(GaussianLatentModel):
    """A VAE from your own networks (any ``nn.Module``: convolutional, residual, ...).

    - ``encoder``: a module, or a list of L modules for L stochastic layers; module l maps
      x [N, D] (l = 0) or a sample of h_l [N, d_l] to the mean and log sigma [N, d_{l+1}]
      each of q(h_{l+1} | .), returned as a tuple.
    - ``decoder``: maps h_1 [N, d_1] to the likelihood's parameters [N, D] (Bernoulli: logits).
    - ``priors``: for L > 1, L - 1 modules; module l - 1 maps h_{l+1} [N, d_{l+1}] to the
      (mean, log sigma) [N, d_l] of p(h_l | h_{l+1}). The top layer's prior is N(0, I).
    - ``latent``: d_1..d_L (an int for one layer).
    - ``likelihood``: a :class:`iwae.likelihoods.Likelihood` or its name (default bernoulli).

    Examples arrive flat, x [N, D]: a convolutional encoder reshapes them to images itself
    (``x.view(-1, 1, 28, 28)``). Samples are flattened into the batch dimension before a
    module is called ([k, B, d] -> [k*B, d]) and restored after, so every module sees a
    plain batch. Weights are the modules' own (their initialization is yours).
    """

    def __init__(
        self,
        encoder: nn.Module | Sequence[nn.Module],
        decoder: nn.Module,
        latent: int | Sequence[int],
        priors: Sequence[nn.Module] = (),
        likelihood: str | Likelihood = "bernoulli",
    ):
        super().__init__()
        self.latent_sizes = (int(latent),) if isinstance(latent, int) else tuple(latent)
        encoders = _module_list(encoder, "the encoder's layers")
        priors = _module_list(priors, "the priors") if priors else []
        if len(encoders) != len(self.latent_sizes) or len(priors) != len(self.latent_sizes) - 1:
            raise IwaeError(
                f"a model with latent sizes {list(self.latent_sizes)} needs "
                f"{len(self.latent_sizes)} encoder module(s) and {len(self.latent_sizes) - 1} "
                f"prior module(s), got {len(encoders)} and {len(priors)}"
            )
        self.encoders = nn.ModuleList(_Flat(m) for m in encoders)
        self.priors = nn.ModuleList(_Flat(m) for m in priors)
        self.decoder = _Flat(_module_list(decoder, "the decoder")[0])
        self.likelihood = get_likelihood(likelihood)

    def q_layers(self) -> Sequence[nn.Module]:
        return self.encoders

    def p_layers(self) -> Sequence[nn.Module]:
        return self.priors

    @property
    def likelihood_net(self) -> nn.Module:
        return self.decoder
