"""A convolutional VAE for images of any size H x W (``iwae train --arch conv``).

The design is the common DCGAN-style one (Radford et al. 2016; as in most convolutional
VAEs). With channel widths c_1..c_n (``--channels 32,64``) and one Gaussian stochastic
layer of d units (``--latent d``):

- q(h | x): x [N, H*W] viewed as one-channel images [N, 1, H, W], then n convolutions of
  kernel 4, stride 2, padding 1 with c_1..c_n channels, each followed by a ReLU (side s
  becomes floor(s / 2)), flattened, and two affine maps to the mean and the log sigma of
  h (sigma = exp, as in :class:`iwae.model.GaussianLayer`; log sigma clamped at
  +-:data:`iwae.model.LOG_STD_LIMIT`);
- p(x | h): an affine map of h to c_n x H_n x W_n and a ReLU, then n transposed
  convolutions of kernel 4, stride 2, padding 1 back up (c_n -> ... -> c_1 -> P channels,
  a ReLU after every one but the last). Each doubles the side and adds an
  ``output_padding`` of s mod 2, so that odd sides (13 x 17) come back exactly. The P =
  ``params_per_dim`` output channels, flattened channel first ([N, P*H*W]: the means of
  every pixel, then their scales), plus one learned bias per output (initialized from the
  pixel mean as the MLP's: :meth:`iwae.likelihoods.Likelihood.initial_bias`) are the
  likelihood's parameters.

The prior is N(0, I). Weights start at torch's default initialization of each layer. The
smallest image side must be at least 2^n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from iwae.errors import IwaeError
from iwae.latent import GaussianLatentModel
from iwae.likelihoods import make_likelihood
from iwae.model import LOG_STD_LIMIT, check_likelihood

#: ``--arch`` choices: Burda et al.'s MLPs (:mod:`iwae.model`) or this module's convolutions
ARCHITECTURES = ("mlp", "conv")
#: ``--channels`` where none is given
DEFAULT_CHANNELS = (32, 64)


@dataclass(frozen=True)
class ConvConfig:
    """Shape of a convolutional VAE (see the module docstring): images ``image_shape``
    (H, W), convolutions of ``channels`` widths, ``latent`` = (d,) (one stochastic layer),
    and the likelihood p(x | h) as in :class:`iwae.model.ModelConfig`."""

    image_shape: tuple[int, int] = (28, 28)
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    latent: tuple[int, ...] = (50,)
    likelihood: str = "bernoulli"
    gaussian_scale: str = "decoder"
    arch: str = "conv"

    def __post_init__(self):
        shape = tuple(int(d) for d in self.image_shape)
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "latent", tuple(int(d) for d in self.latent))
        if len(shape) != 2:
            raise IwaeError(
                f"--arch conv needs images of shape [H, W], got image_shape {list(shape)} "
                "(flat data: use --arch mlp, or give the files as [N, H, W] arrays)"
            )
        if len(self.latent) != 1:
            raise IwaeError(
                f"--arch conv has one stochastic layer: give --latent D (one size), got "
                f"{','.join(map(str, self.latent))}"
            )
        if not self.channels or min(self.channels) < 1 or min(self.latent) < 1:
            raise IwaeError(
                f"--channels and --latent need positive sizes, got channels "
                f"{list(self.channels)} and latent {list(self.latent)}"
            )
        if min(shape) < 2 ** len(self.channels):
            raise IwaeError(
                f"--arch conv with {len(self.channels)} strided convolutions halves each side "
                f"{len(self.channels)} times: images of {shape[0]}x{shape[1]} need at most "
                f"{max(1, min(shape).bit_length() - 1)} entries in --channels"
            )
        if self.arch != "conv":
            raise IwaeError(f"a ConvConfig describes arch conv, got {self.arch!r}")
        check_likelihood(self.likelihood, self.gaussian_scale)

    @property
    def x_dim(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    def sides(self) -> list[tuple[int, int]]:
        """(H, W) of the input and after each strided convolution."""
        sides = [self.image_shape]
        for _ in self.channels:
            h, w = sides[-1]
            sides.append((h // 2, w // 2))
        return sides

    @classmethod
    def from_dict(cls, d: dict) -> ConvConfig:
        return cls(**d)

    def to_dict(self) -> dict:
        return {
            "arch": self.arch,
            "image_shape": list(self.image_shape),
            "channels": list(self.channels),
            "latent": list(self.latent),
            "likelihood": self.likelihood,
            "gaussian_scale": self.gaussian_scale,
        }


def parse_channels(text: str) -> tuple[int, ...]:
    """Channel widths written ``"32,64"`` (``iwae train --channels``)."""
    try:
        channels = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise IwaeError(
            f"--channels: expected positive integers written like 32,64, got {text!r}"
        ) from None
    if any(c < 1 for c in channels):
        raise IwaeError(f"--channels: widths must be positive integers, got {text!r}")
    return channels


class _Images(nn.Module):
    """A module applied to flat inputs with any leading dimensions: [..., prod(shape)] ->
    [N, *shape] for the call (images: shape (1, H, W)), every output [N, ...] back to
    [..., ...]."""

    def __init__(self, module: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.module, self.shape = module, tuple(shape)

    def forward(self, u: Tensor):
        lead = u.shape[:-1]
        out = self.module(u.reshape(-1, *self.shape))
        if isinstance(out, tuple):
            return tuple(o.reshape(*lead, *o.shape[1:]) for o in out)
        return out.reshape(*lead, *out.shape[1:])


class ConvEncoder(nn.Module):
    """q(h | x): strided convolutions, then the mean and log sigma of h ([N, d] each)."""

    def __init__(self, config: ConvConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.ReLU()]
            c_in = c
        self.net = nn.Sequential(*layers, nn.Flatten())
        h, w = config.sides()[-1]
        self.mean = nn.Linear(c_in * h * w, config.latent[0])
        self.log_std = nn.Linear(c_in * h * w, config.latent[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a = self.net(x)
        return self.mean(a), self.log_std(a).clamp(-LOG_STD_LIMIT, LOG_STD_LIMIT)


class ConvDecoder(nn.Module):
    """h [N, d] -> the likelihood's parameters [N, P*H*W] (transposed convolutions)."""

    def __init__(self, config: ConvConfig, params_per_dim: int):
        super().__init__()
        sides, channels = config.sides(), config.channels
        h, w = sides[-1]
        self.top = (channels[-1], h, w)
        self.project = nn.Sequential(nn.Linear(config.latent[0], channels[-1] * h * w), nn.ReLU())
        widths = [params_per_dim, *channels]  # the output, then c_1..c_n
        layers: list[nn.Module] = []
        for i in range(len(channels), 0, -1):  # c_i -> c_{i-1}, side of level i -> level i-1
            (h_out, w_out), (h_in, w_in) = sides[i - 1], sides[i]
            padding = (h_out - 2 * h_in, w_out - 2 * w_in)  # 0 or 1: s mod 2
            layers.append(
                nn.ConvTranspose2d(
                    widths[i], widths[i - 1], 4, stride=2, padding=1, output_padding=padding
                )
            )
            if i > 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.bias = nn.Parameter(torch.zeros(params_per_dim * config.x_dim))

    def forward(self, h: Tensor) -> Tensor:
        a = self.project(h).reshape(-1, *self.top)
        return self.net(a) + self.bias


class ConvVAE(GaussianLatentModel):
    """The convolutional VAE of ``config`` (:class:`ConvConfig`; the module docstring),
    an :class:`iwae.latent.LatentVariableModel`. ``pixel_mean`` [H*W]: the training images'
    mean, from which the decoder's output bias starts."""

    def __init__(self, config: ConvConfig = ConvConfig(), pixel_mean: Tensor | None = None):
        super().__init__()
        self.config = config
        if config.likelihood != "bernoulli":
            self.likelihood = make_likelihood(
                config.likelihood, config.gaussian_scale, config.x_dim
            )
        self.encoder = _Images(ConvEncoder(config), (1, *config.image_shape))
        decoder = ConvDecoder(config, self.likelihood.params_per_dim)
        self.decoder = _Images(decoder, config.latent)
        if pixel_mean is not None:
            with torch.no_grad():
                self.decoder.module.bias.copy_(self.likelihood.initial_bias(pixel_mean))

    @property
    def latent_sizes(self) -> tuple[int, ...]:
        return self.config.latent

    def q_layers(self) -> list[nn.Module]:
        return [self.encoder]

    def p_layers(self) -> list[nn.Module]:
        return []

    @property
    def likelihood_net(self) -> nn.Module:
        return self.decoder
