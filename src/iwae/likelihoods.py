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

import torch
import torch.nn.functional as F
from torch import Tensor

from iwae.errors import IwaeError


class Likelihood:
    """The interface of a likelihood (see the module docstring). ``name`` is what
    ``config.json`` records; ``params_per_dim`` how many decoder outputs each data
    dimension takes (the decoder's last layer has ``params_per_dim * D`` outputs)."""

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


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


def bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over pixels, from logits:
    x*l - softplus(l) = -softplus(-l) for x = 1 and -softplus(l) for x = 0."""
    return x.mul(logits).sub_(F.softplus(logits)).sum(-1)


#: the likelihoods by their ``--likelihood`` names
LIKELIHOODS: dict[str, type[Likelihood]] = {Bernoulli.name: Bernoulli}


def get_likelihood(name: str | Likelihood) -> Likelihood:
    """The likelihood called ``name`` (a :class:`Likelihood` is returned as it is)."""
    if isinstance(name, Likelihood):
        return name
    if name not in LIKELIHOODS:
        raise IwaeError(f"unknown likelihood {name!r}: choose one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name]()
