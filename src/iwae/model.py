"""Burda et al.'s models (2016, section 5): hierarchical Gaussian VAEs of tanh MLPs with a
Bernoulli decoder, one implementation of :class:`iwae.latent.LatentVariableModel`.

Every conditional of q and of p but the top prior N(0, I) is a diagonal Gaussian whose mean
is linear and whose standard deviation is exp(linear) (or softplus(linear)) of a tanh MLP
of its input, and p(x | h_1) is Bernoulli with logits from a tanh MLP. The maths common to
every model (log q, log p, the log-weights, sampling) is in :mod:`iwae.latent`; this module
adds the architecture, its initialization, several models side by side (lockstep
training) and a faster log-likelihood for many samples. The first encoder layer sees x once
per example, not once per sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iwae.errors import IwaeError
from iwae.latent import (  # noqa: F401 (re-exported: their home before iwae.latent)
    LOG_2PI,
    GaussianLatentModel,
    Noise,
    gaussian_log_prob,
    gaussian_rsample,
    standard_normal_log_prob,
)
from iwae.likelihoods import GAUSSIAN_SCALES, LIKELIHOODS, bernoulli_log_prob, make_likelihood

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
    deviation is parameterized ("exp" as in the original code, or "softplus");
    ``likelihood`` names p(x | h_1) (:data:`iwae.likelihoods.LIKELIHOODS`; a Gaussian's
    scale from the decoder or learned, ``gaussian_scale``)."""

    x_dim: int = 784
    latent: tuple[int, ...] = (50,)
    hidden: tuple[tuple[int, ...], ...] = ((200, 200),)
    scale: str = "exp"
    likelihood: str = "bernoulli"
    gaussian_scale: str = "decoder"

    def __post_init__(self):
        object.__setattr__(self, "latent", tuple(int(d) for d in self.latent))
        object.__setattr__(self, "hidden", tuple(tuple(int(h) for h in hs) for hs in self.hidden))
        if len(self.latent) < 1 or len(self.latent) != len(self.hidden):
            raise IwaeError(
                "model needs one hidden-layer list per stochastic layer, got "
                f"latent={self.latent} hidden={self.hidden}"
            )
        if self.scale not in ("exp", "softplus"):
            raise IwaeError(f"unknown scale {self.scale!r}: choose exp or softplus")
        check_likelihood(self.likelihood, self.gaussian_scale)
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
        """The fields as a table; ``likelihood`` only where it is not Bernoulli, and
        ``gaussian_scale`` only for a Gaussian (a Bernoulli MLP's table is the one written
        before these fields existed)."""
        d = asdict(self)
        d["latent"] = list(self.latent)
        d["hidden"] = [list(h) for h in self.hidden]
        if self.likelihood != "gaussian":
            del d["gaussian_scale"]
        if self.likelihood == "bernoulli":
            del d["likelihood"]
        return d


def check_likelihood(name: str, gaussian_scale: str) -> None:
    """``name`` is a likelihood and ``gaussian_scale`` one of :data:`GAUSSIAN_SCALES`."""
    if name not in LIKELIHOODS:
        raise IwaeError(f"unknown likelihood {name!r}: choose one of {', '.join(LIKELIHOODS)}")
    if gaussian_scale not in GAUSSIAN_SCALES:
        raise IwaeError(
            f"unknown gaussian_scale {gaussian_scale!r}: choose one of {', '.join(GAUSSIAN_SCALES)}"
        )


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
    """An affine layer: ``nn.Linear`` for one model, :class:`StackedLinear` for ``models``
    side by side."""
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
        """:func:`iwae.latent.gaussian_rsample` of this layer's (mean, log sigma)."""
        return gaussian_rsample(mean, log_std, k, generator, noise)


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


class VAE(GaussianLatentModel):
    """A VAE with ``len(config.latent)`` stochastic layers (see the module docstring).

    ``encoder[l]`` is q(h_{l+1} | h_l) with h_0 = x; ``decoder[l]`` is p(h_l | h_{l+1})
    for l >= 1 and ``decoder[0]`` the network p(x | h_1) giving the likelihood's
    parameters (``config.likelihood``; Bernoulli: logits), ``params_per_dim * x_dim`` outputs.
    """

    def __init__(
        self,
        config: ModelConfig = ModelConfig(),
        pixel_mean: Tensor | None = None,
        models: int | None = None,
    ):
        super().__init__()
        self.config, self.models = config, models
        if config.likelihood != "bernoulli":  # Bernoulli: the default, no submodule
            self.likelihood = make_likelihood(
                config.likelihood, config.gaussian_scale, config.x_dim
            )
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
                outputs = self.likelihood.params_per_dim * config.x_dim
                decoder.append(nn.Sequential(*net, _linear(d, outputs, models)))
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
        matmuls), from a copy of its weights. A likelihood with parameters of its own (a
        Gaussian's learned scale) is not stacked."""
        if any(True for _ in members[0].likelihood.parameters()):
            raise IwaeError(
                f"{members[0].likelihood!r} has parameters of its own: models with it are not "
                "stacked (train them one by one)"
            )
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

    def reset_parameters(self, pixel_mean: Tensor | None = None) -> None:
        """Glorot-uniform weights, zero biases; the output bias, when the training-set pixel
        mean is given, is :meth:`iwae.likelihoods.Likelihood.initial_bias` of it (Bernoulli:
        the logit of the clipped (0.001..0.999) mean; the others: the mean in their own
        parameterization, log-scales 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if pixel_mean is not None:
            bias = self.likelihood.initial_bias(pixel_mean)
            with torch.no_grad():
                self.output_layer.bias.copy_(bias.expand_as(self.output_layer.bias))

    @property
    def output_layer(self) -> nn.Module:
        return self.decoder[0][-1]

    # -- the three parts of iwae.latent.GaussianLatentModel -----------------------------

    @property
    def latent_sizes(self) -> tuple[int, ...]:
        return self.config.latent

    def q_layers(self) -> nn.ModuleList:
        return self.encoder

    def p_layers(self) -> nn.ModuleList:
        return self.decoder[1:]

    @property
    def likelihood_net(self) -> nn.Module:
        return self.decoder[0]

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters()) + list(self.likelihood.parameters())

    def logits(self, h1: Tensor) -> Tensor:
        """Bernoulli logits of p(x | h_1), shape h1.shape[:-1] + [x_dim]."""
        return self.call_network(self.decoder[0], h1)

    def log_likelihood(self, x: Tensor, h1: Tensor) -> Tensor:
        """log p(x | h_1) = sum_d x_d l_d - softplus(l_d) with logits l = W a + b, shape [k, B].

        The same value as :func:`iwae.likelihoods.bernoulli_log_prob`; with 10 or more
        samples per example computed without a pixel-wide product: sum_d x_d l_d =
        a . (W^T x) + b . x, where a is the last hidden layer (faster from about 10 samples
        on; bench/README.md). Other likelihoods: their own ``log_prob``. The networks (the
        hidden layers and the output layer) run through :meth:`call_network`: in a bf16 step
        ``a`` and the logits come back float32.
        """
        if self.likelihood.name != "bernoulli":
            return super().log_likelihood(x, h1)
        out = self.output_layer
        a = self.call_network(self.decoder[0][:-1], h1)
        if h1.dim() > x.dim():  # samples [..., k, B, d] of examples [..., B, D]
            x = x.unsqueeze(-3)
        if h1.dim() < 3 or h1.shape[-3] < 10:  # few samples: x @ W costs more than it saves
            return bernoulli_log_prob(self.call_network(out, a), x)
        softplus = F.softplus(self.call_network(out, a)).sum(-1)
        if out.bias.dim() == 1:
            return (a * (x @ out.weight)).sum(-1) + x @ out.bias - softplus
        # stacked: [G, 1, D, H], [G, 1, D, 1]
        w, b = out.weight.transpose(1, 2).unsqueeze(1), out.bias[:, None, :, None]
        return (a * (x @ w)).sum(-1) + (x @ b).squeeze(-1) - softplus
