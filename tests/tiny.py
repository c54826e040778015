"""A tiny model and data in float64 for exact checks of the bounds and estimators."""

import math

import torch

from iwae.bounds import elbo
from iwae.model import VAE, ModelConfig


def tiny_model(seed=0, latent=(2,), hidden=((8,),), x_dim=6) -> VAE:
    torch.manual_seed(seed)
    model = VAE(ModelConfig(x_dim=x_dim, latent=latent, hidden=hidden)).double()
    # Glorot init on so small a model gives a nearly flat p(x|h); sharpen it so the
    # posterior is far from q, w~ far from uniform, and the bounds differ from each other.
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(3.0)
    return model


def tiny_data(n=4, x_dim=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, x_dim), 0.5, dtype=torch.float64), generator=g)


def exact_log_px(model: VAE, x: torch.Tensor, half_width=7.0, step=0.02) -> torch.Tensor:
    """log p(x) = log of the integral of p(x|h) N(h; 0, I) over a 2-D grid (midpoint rule)."""
    ticks = torch.arange(-half_width + step / 2, half_width, step, dtype=torch.float64)
    h = torch.cartesian_prod(ticks, ticks)  # [G, 2]
    with torch.no_grad():
        log_joint = model.log_joint(x, [h[:, None, :].expand(-1, x.shape[0], -1)])  # [G, B]
    return torch.logsumexp(log_joint, 0) + 2 * math.log(step)


def fit_encoder(model, x, steps=300):
    """Fit q(h|x) to the posterior (ELBO ascent on the encoder alone), as training would."""
    opt = torch.optim.Adam(model.encoder_parameters(), lr=0.02)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        opt.zero_grad()
        (-elbo(model.log_weights(x, 16, generator=g)).mean()).backward()
        opt.step()
    return model
