"""Hierarchical Gaussian VAEs with a Bernoulli decoder (Burda et al. 2016, section 5).

A model with L stochastic layers h_1..h_L has

    q(h_1..h_L | x) = q(h_1 | x) q(h_2 | h_1) ... q(h_L | h_{L-1})
    p(x, h_1..h_L)  = p(h_L) p(h_{L-1} | h_L) ... p(h_1 | h_2) p(x | h_1)

with p(h_L) = N(0, I), every other conditional a diagonal Gaussian whose mean is
linear and whose standard deviation is exp(linear) (or softplus(linear)) of a tanh
MLP of its input, and p(x | h_1) Bernoulli with logits from a tanh MLP.

Samples are stacked on a leading dimension: a tensor of k samples for a batch of B
examples has shape [k, B, dim], and log-densities have shape [k, B]. The first
encoder layer sees x once per example, not once per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iwae.errors import IwaeError

LOG_2PI = math.log(2 * math.pi)

#: A source of standard normal noise: ``noise(shape, dtype, device)`` -> Tensor. The model
#: draws from ``torch.randn`` with a generator unless it is given one of these explicitly.
Noise = Callable[[tuple, torch.dtype, torch.device], Tensor]
LOG_STD_LIMIT = (
    15.0  # |log sigma| of every Gaussian layer is clamped here (never reached in training)
)

#: Burda et al.'s architectures: stochastic layer sizes and the deterministic
#: (tanh) hidden layers of the encoder network for each stochastic layer. The
#: decoder mirrors them: p(h_{l-1} | h_l) uses the hidden sizes of layer l reversed.
PRESETS = {
    1: {"latent": (50,), "hidden": ((200, 200),)},
    2: {"latent": (100, 50), "hidden": ((200, 200), (100, 100))},
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a model: ``latent[l]`` units in stochastic layer l+1, reached by
    tanh layers ``hidden[l]``; ``scale`` is how a Gaussian layer's standard
    deviation is parameterized ("exp" as in the original code, or "softplus")."""

    x_dim: int = 784
    latent: tuple[int, ...] = (50,)
    hidden: tuple[tuple[int, ...], ...] = ((200, 200),)
    scale: str = "exp"

    def __post_init__(self):
        object.__setattr__(self, "latent", tuple(int(d) for d in self.latent))
        object.__setattr__(self, "hidden", tuple(tuple(int(h) for h in hs) for hs in self.hidden))
        if len(self.latent) < 1 or len(self.latent) != len(self.hidden):
            raise IwaeError(
                f"model needs one hidden-layer list per stochastic layer, got latent={self.latent} hidden={self.hidden}"
            )
        if self.scale not in ("exp", "softplus"):
            raise IwaeError(f"unknown scale {self.scale!r}: choose exp or softplus")
        if self.x_dim < 1 or min(self.latent) < 1 or any(h < 1 for hs in self.hidden for h in hs):
            raise IwaeError(f"layer sizes must be positive: {self}")

    @classmethod
    def preset(cls, layers: int, x_dim: int = 784, scale: str = "exp") -> ModelConfig:
        if layers not in PRESETS:
            raise IwaeError(
                f"no preset with {layers} stochastic layers: choose one of {sorted(PRESETS)}"
            )
        return cls(x_dim=x_dim, scale=scale, **PRESETS[layers])

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latent"] = list(self.latent)
        d["hidden"] = [list(h) for h in self.hidden]
        return d


def parse_latent(text: str) -> tuple[int, ...]:
    """Stochastic layer sizes written ``"100,50"`` (``iwae train --latent``): one positive
    integer per stochastic layer, from x up."""
    return tuple(_positive_sizes(text, ",", "--latent", "100,50"))


def parse_hidden(text: str) -> tuple[tuple[int, ...], ...]:
    """Deterministic hidden layers written ``"200x200,100x100"`` (``iwae train --hidden``):
    one ``x``-separated list of positive sizes per stochastic layer, in the order of
    ``--latent``. The decoder mirrors them (see :data:`PRESETS`)."""
    return tuple(
        tuple(_positive_sizes(part, "x", "--hidden", "200x200,100x100")) for part in text.split(",")
    )


def _positive_sizes(text: str, sep: str, flag: str, example: str) -> list[int]:
    parts = [part.strip() for part in str(text).split(sep)]
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        raise IwaeError(
            f"{flag}: expected positive integers written like {example}, got {text!r}"
        ) from None
    if any(size < 1 for size in sizes):
        raise IwaeError(f"{flag}: layer sizes must be positive integers, got {text!r}")
    return sizes


#: below this many elements torch.tanh is used as it is (the saving would not pay for the
#: extra calls)
FAST_TANH_MIN = 65536


def _sigmoid_form_tanh(x: Tensor) -> Tensor:
    """tanh(x) = 2 sigmoid(2x) - 1."""
    return torch.sigmoid(x * 2.0).mul_(2.0).sub_(1.0)


class _SigmoidTanh(torch.autograd.Function):
    """y = tanh(x) = 2 sigmoid(2x) - 1, with the backward of tanh, g (1 - y^2)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = _sigmoid_form_tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


class Tanh(nn.Module):
    """tanh. On CPU, for large tensors, computed as 2 sigmoid(2x) - 1: torch's CPU tanh
    kernel is about 4x slower than its sigmoid kernel (bench/README.md), and the two
    agree within 2e-7 (absolute; outputs lie in [-1, 1]). Elsewhere torch.tanh."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.numel() < FAST_TANH_MIN:
            return torch.tanh(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _SigmoidTanh.apply(x)
        return _sigmoid_form_tanh(x)


class StackedLinear(nn.Module):
    """``models`` affine layers of the same shape applied side by side: y[g] = x[g] W[g]^T + b[g]
    for x of shape [models, ..., in_features], with one batched matmul (``torch.baddbmm``).

    The parameters are named as :class:`torch.nn.Linear`'s, with a leading model dimension,
    and the weight is stored transposed, ``weight`` [models, in, out] (= W[g]^T), so that
    the batched matmul and its gradient need no strided copies; ``bias`` is [models, out].
    :meth:`VAE.stack` and :meth:`VAE.member_state` convert from and to ``nn.Linear``'s layout."""

    def __init__(self, models: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(models, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(models, out_features))
        for g in range(models):
            nn.init.xavier_uniform_(self.weight.data[g])  # symmetric in fan-in and fan-out
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        g = x.shape[0]
        y = torch.baddbmm(self.bias.unsqueeze(1), x.reshape(g, -1, x.shape[-1]), self.weight)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _linear(d_in: int, d_out: int, models: int | None) -> nn.Module:
    """An affine layer: ``nn.Linear`` for one model, :class:`StackedLinear` for ``models`` side by side."""
    return nn.Linear(d_in, d_out) if models is None else StackedLinear(models, d_in, d_out)


def _mlp(
    d_in: int, hidden: tuple[int, ...], models: int | None = None
) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [_linear(d_in, h, models), Tanh()]
        d_in = h
    return nn.Sequential(*layers), d_in


class GaussianLayer(nn.Module):
    """A conditional diagonal Gaussian N(mu(u), diag sigma(u)^2): mu = linear,
    sigma = exp(linear) or softplus(linear) of a tanh MLP of u (``models`` of them side
    by side with a leading model dimension, see :class:`VAE`)."""

    def __init__(
        self,
        d_in: int,
        hidden: tuple[int, ...],
        d_out: int,
        scale: str = "exp",
        models: int | None = None,
    ):
        super().__init__()
        self.net, d = _mlp(d_in, hidden, models)
        self.mean = _linear(d, d_out, models)
        self.scale = _linear(d, d_out, models)
        self.scale_kind = scale

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log standard deviation, each of shape u.shape[:-1] + [d_out]."""
        a = self.net(u)
        s = self.scale(a)
        if self.scale_kind == "exp":
            log_std = s
        else:  # log(softplus(s)), exact for very negative s where softplus(s) = exp(s)
            log_std = torch.where(s < -20.0, s, F.softplus(s).log())
        # a numerical guard, inactive at normal values: sigma stays within [3e-7, 3e6]
        return self.mean(a), log_std.clamp(-LOG_STD_LIMIT, LOG_STD_LIMIT)

    def rsample(
        self,
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
        device)`` when given (e.g. :class:`BatchShard`), else from ``torch.randn`` with
        ``generator``. The log-density is computed from eps, which is the same value and
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


class BatchShard:
    """Noise for one process's share of a batch in data-parallel training (a :data:`Noise`).

    It draws the noise of the whole batch of ``batch_size`` examples from ``generator``,
    exactly as a single process would, and keeps the examples ``index`` along the batch
    dimension (dimension 1 of [k, B, d]). So N processes together compute the same
    samples, and the same gradient, as one process.
    """

    def __init__(self, generator: torch.Generator, batch_size: int, index: Tensor):
        self.generator, self.batch_size, self.index = generator, batch_size, index

    def __call__(self, shape, dtype, device) -> Tensor:
        full = (shape[0], self.batch_size, *shape[2:])
        return torch.randn(full, dtype=dtype, device=device, generator=self.generator)[
            :, self.index
        ]


def gaussian_log_prob(h: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(h; mean, diag exp(log_std)^2) summed over the last dimension; parameters of
    shape [..., B, d] are shared by samples h of shape [..., k, B, d]."""
    if mean.dim() < h.dim():
        mean, log_std = mean.unsqueeze(-3), log_std.unsqueeze(-3)
    z = (h - mean) * torch.exp(-log_std)
    return -0.5 * z.square().sum(-1) - log_std.sum(-1) - 0.5 * LOG_2PI * h.shape[-1]


def standard_normal_log_prob(h: Tensor) -> Tensor:
    return -0.5 * h.square().sum(-1) - 0.5 * LOG_2PI * h.shape[-1]


def bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over pixels, from logits:
    x*l - softplus(l) = -softplus(-l) for x = 1 and -softplus(l) for x = 0."""
    return x.mul(logits).sub_(F.softplus(logits)).sum(-1)


class VAE(nn.Module):
    """A VAE with ``len(config.latent)`` stochastic layers (see the module docstring).

    ``encoder[l]`` is q(h_{l+1} | h_l) with h_0 = x; ``decoder[l]`` is p(h_l | h_{l+1})
    for l >= 1 and ``decoder[0]`` the Bernoulli network p(x | h_1) giving logits.
    """

    def __init__(
        self,
        config: ModelConfig = ModelConfig(),
        pixel_mean: Tensor | None = None,
        models: int | None = None,
    ):
        super().__init__()
        self.config, self.models = config, models
        sizes = (config.x_dim, *config.latent)
        self.encoder = nn.ModuleList(
            GaussianLayer(sizes[l], config.hidden[l], sizes[l + 1], config.scale, models)
            for l in range(len(config.latent))
        )
        decoder: list[nn.Module] = []
        for l in range(len(config.latent)):
            hidden = tuple(reversed(config.hidden[l]))
            if l == 0:
                net, d = _mlp(sizes[1], hidden, models)
                decoder.append(nn.Sequential(*net, _linear(d, config.x_dim, models)))
            else:
                decoder.append(GaussianLayer(sizes[l + 1], hidden, sizes[l], config.scale, models))
        self.decoder = nn.ModuleList(decoder)
        self.reset_parameters(pixel_mean)

    # -- several models side by side (lockstep training) ------------------------------

    @classmethod
    def stack(cls, members: list[VAE]) -> VAE:
        """One VAE holding ``members`` (of one architecture) side by side: ``models =
        len(members)`` and a leading model dimension on every parameter and on every
        tensor it computes with: x [G, B, D], samples [G, k, B, d], log-weights [G, k, B].
        Model g computes what ``members[g]`` computes (up to the rounding of batched
        matmuls), from a copy of its weights."""
        stacked = cls(members[0].config, models=len(members)).to(
            next(members[0].parameters()).device
        )
        states = [m.state_dict() for m in members]
        with torch.no_grad():
            for name, p in stacked.named_parameters():
                p.copy_(stacked.stacked_layout(name, [state[name] for state in states]))
        return stacked

    def stacked_layout(self, name: str, tensors: list[Tensor]) -> Tensor:
        """Per-model tensors of parameter ``name`` (weights, or Adam's moments of them) in a
        single VAE's layout, stacked in this stacked VAE's layout."""
        return torch.stack([t.T if name in self._transposed else t for t in tensors])

    def member_layout(self, name: str, stacked: Tensor, g: int) -> Tensor:
        """Model g's part of ``stacked`` (parameter ``name``'s layout) in a single VAE's layout."""
        return (stacked[g].T if name in self._transposed else stacked[g]).contiguous()

    @property
    def _transposed(self) -> set[str]:
        return {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, StackedLinear)}

    def member_state(self, g: int) -> dict[str, Tensor]:
        """The weights of model g of a stacked VAE, as a single VAE's state dict."""
        return {
            name: self.member_layout(name, p.detach(), g).clone()
            for name, p in self.named_parameters()
        }

    @property
    def n_layers(self) -> int:
        return len(self.config.latent)

    def reset_parameters(self, pixel_mean: Tensor | None = None) -> None:
        """Glorot-uniform weights, zero biases; the output bias is the logit of the
        clipped (0.001..0.999) training-set pixel mean when one is given."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if pixel_mean is not None:
            p = torch.as_tensor(pixel_mean, dtype=torch.float32).reshape(-1).clamp(0.001, 0.999)
            with torch.no_grad():
                self.output_layer.bias.copy_(torch.logit(p).expand_as(self.output_layer.bias))

    @property
    def output_layer(self) -> nn.Module:
        return self.decoder[0][-1]

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    # -- the distributions, one method per term of the maths -------------------------

    def sample_q(
        self, x: Tensor, k: int, generator=None, noise: Noise | None = None
    ) -> list[Tensor]:
        """k reparameterized samples h_1..h_L ~ q(. | x): a list of [k, B, d_l] tensors."""
        return self._sample_q(x, k, generator, noise)[0]

    def log_q(self, hs: list[Tensor], x: Tensor) -> Tensor:
        """log q(h_1..h_L | x), shape [k, B]."""
        total = 0.0
        inputs = [x, *hs[:-1]]
        for layer, u, h in zip(self.encoder, inputs, hs):
            mean, log_std = layer(u)
            total = total + gaussian_log_prob(h, mean, log_std)
        return total

    def log_prior(self, hs: list[Tensor]) -> Tensor:
        """log p(h_1..h_L) = log p(h_L) + sum_l log p(h_l | h_{l+1}), shape [k, B]."""
        total = standard_normal_log_prob(hs[-1])
        for l in range(1, self.n_layers):
            mean, log_std = self.decoder[l](hs[l])
            total = total + gaussian_log_prob(hs[l - 1], mean, log_std)
        return total

    def logits(self, h1: Tensor) -> Tensor:
        """Bernoulli logits of p(x | h_1), shape h1.shape[:-1] + [x_dim]."""
        return self.decoder[0](h1)

    def log_likelihood(self, x: Tensor, h1: Tensor) -> Tensor:
        """log p(x | h_1) = sum_d x_d l_d - softplus(l_d) with logits l = W a + b, shape [k, B].

        The same value as :func:`bernoulli_log_prob`; with 10 or more samples per example
        computed without a pixel-wide product: sum_d x_d l_d = a . (W^T x) + b . x, where a
        is the last hidden layer (faster from about 10 samples on; bench/README.md).
        """
        out = self.output_layer
        a = self.decoder[0][:-1](h1)
        if h1.dim() > x.dim():  # samples [..., k, B, d] of examples [..., B, D]
            x = x.unsqueeze(-3)
        if (
            h1.dim() < 3 or h1.shape[-3] < 10
        ):  # few samples per example: x @ W costs more than it saves
            return bernoulli_log_prob(out(a), x)
        if out.bias.dim() == 1:
            return (a * (x @ out.weight)).sum(-1) + x @ out.bias - F.softplus(out(a)).sum(-1)
        w, b = (
            out.weight.transpose(1, 2).unsqueeze(1),
            out.bias[:, None, :, None],
        )  # stacked: [G, 1, D, H], [G, 1, D, 1]
        return (a * (x @ w)).sum(-1) + (x @ b).squeeze(-1) - F.softplus(out(a)).sum(-1)

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

    def log_q_stopped(self, hs: list[Tensor], x: Tensor) -> Tensor:
        """log q_{stop(phi)}(h_1..h_L | x), shape [k, B]: every layer's density with its
        parameters detached, still a function of its sample h_l and of its input h_{l-1}
        (so for L > 1 the gradient reaches h_{l-1} through q(h_l | h_{l-1}) as well)."""
        total = 0.0
        inputs = [x, *hs[:-1]]
        for layer, u, h in zip(self.encoder, inputs, hs):
            fixed = {name: p.detach() for name, p in layer.named_parameters()}
            mean, log_std = torch.func.functional_call(layer, fixed, (u,))
            total = total + gaussian_log_prob(h, mean, log_std)
        return total

    def _sample_q(
        self, x: Tensor, k: int, generator=None, noise: Noise | None = None
    ) -> tuple[list[Tensor], Tensor]:
        hs: list[Tensor] = []
        log_q = 0.0
        u = x
        for l, layer in enumerate(self.encoder):
            mean, log_std = layer(u)
            h, lp = layer.rsample(mean, log_std, k if l == 0 else None, generator, noise)
            hs.append(h)
            log_q = log_q + lp
            u = h
        return hs, log_q

    # -- generation ------------------------------------------------------------------

    def sample_prior(self, n: int, generator=None) -> list[Tensor]:
        """Ancestral samples h_1..h_L ~ p(h) for n draws: a list of [n, d_l] tensors."""
        p = next(self.parameters())
        h = torch.randn(
            (n, self.config.latent[-1]), dtype=p.dtype, device=p.device, generator=generator
        )
        hs = [h]
        for l in range(self.n_layers - 1, 0, -1):
            mean, log_std = self.decoder[l](h)
            h, _ = self.decoder[l].rsample(mean, log_std, generator=generator)
            hs.insert(0, h)
        return hs

    def decode(self, h1: Tensor) -> Tensor:
        """Pixel probabilities sigmoid(logits) of p(x | h_1)."""
        return torch.sigmoid(self.logits(h1))

    @torch.no_grad()
    def sample_images(self, n: int, generator=None) -> Tensor:
        """Pixel probabilities of n images generated from the prior, shape [n, x_dim]."""
        return self.decode(self.sample_prior(n, generator)[0])
