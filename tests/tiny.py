"""A tiny model and data in float64 for exact checks of the bounds and estimators."""

import torch

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
