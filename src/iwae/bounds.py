"""Bounds on log p(x) and the objectives trained with them.

Every bound is a reduction of one tensor of log-weights

    log w[s, b] = log p(x_b, h_s) - log q(h_s | x_b),   shape [S, B],

made by :meth:`iwae.model.VAE.log_weights`. For the grouped objectives of Rainforth
et al. (2018) the S = M*K samples are read as M groups of K: group m holds samples
m*K .. m*K + K - 1 (``log_w.view(M, K, B)``).

Gradient estimators (``Objective.estimator``), with h_i = h(eps_i, phi) ~ q_phi(h | x),
log w_i = log p_theta(x, h_i) - log q_phi(h_i | x) and w~_i = w_i / sum_j w_j:

- ``reparam``: the gradient of the bound itself, grad L_K = sum_i w~_i d log w_i / d(theta, phi),
  where d/dphi log w_i has a path term (through h_i) and a score term -d/dphi log q_phi(h_i).
- ``stl`` (sticking the landing, Roeder et al. 2017): the score term is dropped, i.e. log q
  is evaluated with phi stopped: grad_phi ~ sum_i w~_i (d log w_i / d h_i)(d h_i / d phi).
  Unbiased for K = 1 (the score has mean zero), biased for K > 1.
- ``dreg`` (doubly reparameterized, Tucker et al. 2019, eq. 7):
  grad_phi L_K = E[ sum_i w~_i^2 (d log w_i / d h_i)(d h_i / d phi) ], unbiased for every K;
  the decoder gradient is unchanged, grad_theta = sum_i w~_i grad_theta log w_i. For
  MIWAE/PIWAE w~ is normalized within each group of K; for CIWAE the encoder gets
  beta * (STL gradient of the VAE part) + (1 - beta) * (DReG of the IWAE part); for the VAE
  (each sample its own group of one, w~ = 1) DReG is STL.

STL and DReG differentiate log-weights made with ``VAE.log_weights(x, S, stop_q=True)``
(:meth:`Objective.log_weights` picks the right kind): the same values, with phi stopped
inside log q. With L > 1 stochastic layers q(h_1..h_L | x) is one reparameterized
distribution h = T(eps, phi) (h_l = mean_l(h_{l-1}) + sigma_l(h_{l-1}) eps_l), and
d log w_i / d h_i is the derivative with respect to all of h_1..h_L, including the
dependence of q(h_l | h_{l-1}) on its input h_{l-1}. The identity behind DReG,
E_q[f(h) grad_phi log q_phi(h)] = E_eps[(d f / d h)(d T / d phi)], holds for any such
reparameterization, so this joint form is unbiased for hierarchical q (this is the
hierarchical-q case of Bauer & Mnih 2021; their generalization for parameters shared with
p is not needed here, as p and q share none). ``tests/test_estimators.py`` checks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from iwae.errors import IwaeError

OBJECTIVES = ("vae", "iwae", "miwae", "ciwae", "piwae")
ESTIMATORS = ("reparam", "stl", "dreg")


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


def dreg_surrogate(log_w: Tensor, m: int = 1) -> Tensor:
    """A surrogate whose encoder gradient is the DReG estimator of MIWAE(M, K) (IWAE_K for
    M = 1), for log-weights made with q's parameters stopped (``stop_q=True``):

        (1/M) sum_m sum_k stop(w~_{m,k}^2) log w_{m,k},  w~_{m,k} = w_{m,k} / sum_j w_{m,j},

    the weights normalized within each group. Its value is not a bound (only its gradient
    is used) and its decoder gradient is not the bound's.   [M*K, B] -> [B]"""
    S, B = log_w.shape
    if m < 1 or S % m:
        raise IwaeError(f"cannot split {S} samples into {m} equal groups")
    groups = log_w.reshape(m, S // m, B)
    w_tilde = torch.softmax(groups.detach(), 1)
    return (w_tilde.square() * groups).sum(1).mean(0)


@dataclass(frozen=True)
class Bound:
    """A bound of your own, trained and evaluated like the built-in ones.

    ``fn`` maps log-weights [S, B] (:meth:`iwae.latent.LatentVariableModel.log_weights`) to
    the bound per example [B]; ``name`` labels it in logs and progress bars; ``samples`` is
    the S it needs (None: the objective's ``k``). ``surrogate``, optional, maps the same
    log-weights to a [B] tensor whose *encoder* gradient is the one to use (the decoder's
    still comes from ``fn``), e.g. a doubly reparameterized estimator: with one, the
    gradient takes the "split" route of :data:`GRADIENT_ROUTES`, and log-weights are made
    with q stopped for the stl and dreg estimators as for the built-in bounds. Without one,
    ``fn`` is differentiated with respect to all parameters (reparam, or stl through stopped
    log-weights); dreg then has nothing to use and is refused.

    Example, the variational Renyi bound of Li & Turner (2016), alpha in [0, 1):
    ``Bound(lambda lw: iwae((1 - alpha) * lw) / (1 - alpha), "renyi")``.
    """

    fn: Callable[[Tensor], Tensor]
    name: str
    samples: int | None = None
    surrogate: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise IwaeError(f"a bound must be a function of the log-weights, got {self.fn!r}")
        if self.surrogate is not None and not callable(self.surrogate):
            raise IwaeError(f"a bound's surrogate must be a function, got {self.surrogate!r}")
        if self.samples is not None and (not isinstance(self.samples, int) or self.samples < 1):
            raise IwaeError(f"a bound's samples must be an integer >= 1, got {self.samples!r}")


#: How the gradient of each objective reaches the two networks, per estimator:
#: "joint" = minus the batch-mean bound differentiated with respect to all parameters;
#: "split" = the decoder's gradient from the bound (IWAE over all M*K samples for PIWAE),
#: the encoder's from :meth:`Objective.encoder_surrogate`.
GRADIENT_ROUTES = {
    #          reparam   stl      dreg
    "vae": ("joint", "joint", "joint"),  # DReG of the VAE (groups of one, w~ = 1) is STL
    "iwae": ("joint", "joint", "split"),
    "miwae": ("joint", "joint", "split"),
    "ciwae": ("joint", "joint", "split"),
    "piwae": ("split", "split", "split"),  # two bounds: IWAE for the decoder, MIWAE for the encoder
}


@dataclass(frozen=True)
class Objective:
    """A training objective: which bound, with ``k`` samples in each of ``m`` groups.

    - vae:   L_VAE over k samples (m = 1)
    - iwae:  L_k (m = 1)
    - miwae: MIWAE(m, k)
    - ciwae: CIWAE(beta) over k samples (m = 1)
    - piwae: PIWAE(m, k): decoder parameters theta ascend IWAE over all m*k samples,
      encoder parameters phi ascend MIWAE(m, k), each receiving only its own gradient.

    ``estimator`` is how the encoder's gradient is estimated: reparam, stl or dreg (see the
    module docstring); the decoder's gradient and the bound's value do not depend on it.

    ``custom``: a :class:`Bound` of your own in place of the named ones (``name`` is then
    its name, and ``k`` its ``samples`` where it says).
    """

    name: str = "iwae"
    k: int = 1
    m: int = 1
    beta: float = 0.5
    estimator: str = "reparam"
    custom: Bound | None = None

    def __post_init__(self):
        if self.custom is not None:
            self._check_custom()
        elif self.name not in OBJECTIVES:
            raise IwaeError(
                f"unknown objective {self.name!r}: choose one of {', '.join(OBJECTIVES)}"
            )
        if not isinstance(self.k, int) or self.k < 1:
            raise IwaeError(f"k must be an integer >= 1, got {self.k!r}")
        if not isinstance(self.m, int) or self.m < 1:
            raise IwaeError(f"m must be an integer >= 1, got {self.m!r}")
        if self.m > 1 and self.name not in ("miwae", "piwae"):
            raise IwaeError(
                f"-m (groups) applies to miwae and piwae only; {self.name} uses k samples"
            )
        if not (0.0 <= self.beta <= 1.0) or math.isnan(self.beta):
            raise IwaeError(f"beta must lie in [0, 1], got {self.beta!r}")
        if self.estimator not in ESTIMATORS:
            raise IwaeError(
                f"unknown estimator {self.estimator!r}: choose one of {', '.join(ESTIMATORS)}"
            )

    def _check_custom(self) -> None:
        if not isinstance(self.custom, Bound):
            raise IwaeError(f"custom must be an iwae.bounds.Bound, got {self.custom!r}")
        object.__setattr__(self, "name", self.custom.name)
        if self.custom.samples is not None:
            object.__setattr__(self, "k", self.custom.samples)
        if self.m != 1:
            raise IwaeError(f"-m (groups) applies to miwae and piwae only, not to {self.name}")
        if self.estimator == "dreg" and self.custom.surrogate is None:
            raise IwaeError(
                f"the dreg estimator of {self.name} needs the bound's own surrogate for the "
                "encoder gradient (Bound(surrogate=...)); use reparam or stl without one"
            )

    @property
    def samples(self) -> int:
        """Importance samples drawn per example: M*K."""
        return self.m * self.k

    @property
    def stops_q(self) -> bool:
        """Whether the log-weights are made with q's parameters stopped inside log q: the
        one place this is decided (the stl and dreg estimators; see the module docstring)."""
        return self.estimator != "reparam"

    def __str__(self) -> str:
        if self.custom is not None:  # name(k=5), or name(alpha=0.5, k=5) for a parameterized one
            text = (
                f"{self.name[:-1]}, k={self.k})"
                if self.name.endswith(")")
                else f"{self.name}(k={self.k})"
            )
        elif self.name in ("miwae", "piwae"):
            text = f"{self.name.upper()}({self.m},{self.k})"
        elif self.name == "ciwae":
            text = f"CIWAE(beta={self.beta:g}, k={self.k})"
        else:
            text = f"{self.name.upper()}(k={self.k})"
        return text if self.estimator == "reparam" else f"{text} {self.estimator.upper()}"

    def to_dict(self) -> dict:
        keys = ("name", "k", "m", "beta", "estimator")
        return {key: getattr(self, key) for key in keys}

    @property
    def route(self) -> str:
        """ "joint" or "split": :data:`GRADIENT_ROUTES` for this objective and estimator; for
        a :class:`Bound` of your own "split" where it has a surrogate, else "joint"."""
        if self.custom is not None:
            return "joint" if self.custom.surrogate is None else "split"
        return GRADIENT_ROUTES[self.name][ESTIMATORS.index(self.estimator)]

    def bound(self, log_w: Tensor) -> Tensor:
        """The objective's bound per example, [S, B] -> [B]; for PIWAE the decoder's
        bound IWAE over all M*K samples (the encoder's is MIWAE(M, K))."""
        if self.custom is not None:
            return self.custom.fn(log_w)
        if self.name == "vae":
            return elbo(log_w)
        if self.name in ("iwae", "piwae"):
            return iwae(log_w)
        if self.name == "miwae":
            return miwae(log_w, self.m)
        return ciwae(log_w, self.beta)

    def log_weights(self, model, x: Tensor, generator=None, noise=None) -> Tensor:
        """The M*K log-weights per example that :meth:`backward` expects, [M*K, B]: with
        q's parameters stopped inside log q for the stl and dreg estimators (``noise``: an
        explicit source of the samples' noise, :data:`iwae.model.Noise`)."""
        return model.log_weights(x, self.samples, generator, stop_q=self.stops_q, noise=noise)

    def encoder_surrogate(self, log_w: Tensor) -> Tensor:
        """Per example [B], the function whose encoder gradient is this estimator's:
        the encoder's bound (MIWAE(M, K) for PIWAE, else :meth:`bound`) for reparam and stl
        (stl through stopped log-weights), :func:`dreg_surrogate` for dreg, and for CIWAE
        beta * L_VAE + (1 - beta) * dreg_surrogate(log_w); a :class:`Bound`'s own surrogate."""
        if self.custom is not None:
            return self.custom.surrogate(log_w)
        if self.estimator == "dreg" and self.name != "vae":
            if self.name == "ciwae":
                return self.beta * elbo(log_w) + (1.0 - self.beta) * dreg_surrogate(log_w)
            return dreg_surrogate(log_w, self.m)
        return miwae(log_w, self.m) if self.name == "piwae" else self.bound(log_w)

    def backward(self, log_w: Tensor, encoder_params, decoder_params) -> Tensor:
        """Accumulate into ``.grad`` the gradient of minus the batch-mean objective and
        return the batch-mean bound (detached) for logging.

        ``log_w`` must come from :meth:`log_weights` (stl and dreg need q's parameters
        stopped inside log q; plain ``model.log_weights`` would give them a biased score term).

        :data:`GRADIENT_ROUTES` says which objectives are one bound differentiated with
        respect to all parameters ("joint": all but PIWAE under reparam and stl) and which
        route two surrogates to two parameter sets ("split"): grad_theta = -grad_theta
        mean_b bound (IWAE_{M*K} for PIWAE) and grad_phi = -grad_phi mean_b
        :meth:`encoder_surrogate`.
        """
        value = self.bound(log_w).mean()
        if self.route == "joint":
            (-value).backward()
            return value.detach()
        encoder_params, decoder_params = list(encoder_params), list(decoder_params)
        enc_loss = -self.encoder_surrogate(log_w).mean()
        enc_grads = torch.autograd.grad(enc_loss, encoder_params, retain_graph=True)
        dec_grads = torch.autograd.grad(-value, decoder_params)
        _accumulate(encoder_params + decoder_params, enc_grads + dec_grads)
        return value.detach()


def backward_stacked(
    objectives: list[Objective], log_w: Tensor, encoder_params, decoder_params
) -> Tensor:
    """:meth:`Objective.backward` for G models side by side (lockstep training): model g's
    log-weights are ``log_w[g]`` (``log_w`` [G, S, B]) and its objective ``objectives[g]``.

    The models' parameters are disjoint slices of the stacked parameters (``[G, ...]``), so
    differentiating the sum over models of each model's loss gives every model the gradient
    of its own objective, routed as :data:`GRADIENT_ROUTES` says: the decoder slices from
    the bounds, the encoder slices from the bound ("joint") or the encoder surrogate
    ("split") of their model. Returns the batch-mean bound of each model, [G] (detached).
    """
    values = _per_model(objectives, log_w, lambda o, lw: o.bound(lw))
    if all(o.route == "joint" for o in objectives):
        (-values.sum()).backward()
        return values.detach()
    encoder_params, decoder_params = list(encoder_params), list(decoder_params)
    enc_terms = _per_model(
        objectives,
        log_w,
        lambda o, lw: o.encoder_surrogate(lw) if o.route == "split" else o.bound(lw),
    )
    enc_grads = torch.autograd.grad(-enc_terms.sum(), encoder_params, retain_graph=True)
    dec_grads = torch.autograd.grad(-values.sum(), decoder_params)
    _accumulate(encoder_params + decoder_params, enc_grads + dec_grads)
    return values.detach()


def _accumulate(params, grads) -> None:
    """``p.grad += g``, with every gradient laid out as its parameter: torch.autograd.grad
    may return a strided view (the gradient of a transposed weight), which torch's fused
    CPU Adam would read in the wrong order (a ``.backward()`` accumulates in layout)."""
    for p, g in zip(params, grads):
        g = g.contiguous()
        p.grad = g if p.grad is None else p.grad + g


def _per_model(objectives: list[Objective], log_w: Tensor, reduce) -> Tensor:
    """[G] batch means of ``reduce(objective, log_w)`` per model, computed once for all the
    models that share an objective: every reduction works column by column on [S, B], so
    their log-weights are laid side by side as one [S, n * B] tensor. Models are picked by
    integer views, never by a list index: that would build an index tensor from Python data
    in every step, on a GPU a host-to-device copy that waits for the device and cannot be
    captured in a CUDA graph."""
    G, S, B = log_w.shape
    out: list[Tensor | None] = [None] * G
    for objective in dict.fromkeys(objectives):
        index = [g for g, o in enumerate(objectives) if o == objective]
        columns = torch.cat([log_w[g] for g in index], dim=1)  # [S, n * B], model by model
        means = reduce(objective, columns).reshape(len(index), B).mean(1)
        for j, g in enumerate(index):
            out[g] = means[j]
    return torch.stack(out)
