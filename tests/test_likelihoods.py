"""Likelihoods: each sums or integrates to 1 over x, and matches torch.distributions or SciPy."""

import itertools
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from iwae.likelihoods import (
    LOG_SCALE_FLOOR,
    Bernoulli,
    ContinuousBernoulli,
    Gaussian,
    Logistic256,
    bits_per_dim,
    floored_log_scale,
    get_likelihood,
)

LOGITS = [-30.0, -4.0, -0.3, -1e-5, 0.0, 2e-4, 0.01, 0.7, 5.0, 25.0]


def test_bernoulli_sums_to_one_and_matches_torch():
    logits = torch.tensor([[-2.0, 0.5, 3.0]], dtype=torch.float64)
    xs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)
    log_p = Bernoulli().log_prob(logits.expand(8, 3), xs)
    assert math.isclose(log_p.exp().sum().item(), 1.0, rel_tol=1e-12)
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(xs).sum(-1)
    assert torch.allclose(log_p, ref, rtol=0, atol=1e-12)


def test_continuous_bernoulli_integrates_to_one_near_and_far_from_a_half():
    cb = ContinuousBernoulli()
    for l in LOGITS:

        def density(x, l=l):
            params = torch.tensor([[l]], dtype=torch.float64)
            return math.exp(cb.log_prob(params, torch.tensor([[x]], dtype=torch.float64)).item())

        total, _ = scipy.integrate.quad(density, 0.0, 1.0, limit=200)
        assert math.isclose(total, 1.0, rel_tol=1e-7), l


def test_continuous_bernoulli_matches_its_closed_form_and_torch():
    """log p(x) = log(l e^{lx} / (e^l - 1)) in float64 mpmath-free closed form, and torch's."""
    cb = ContinuousBernoulli()
    x = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    for l in [-4.0, -0.3, 0.7, 5.0]:
        ours = cb.log_prob(torch.full((11, 1), l, dtype=torch.float64), x[:, None])
        closed = math.log(abs(l)) + l * x - math.log(abs(math.expm1(l)))
        assert torch.allclose(ours, closed, rtol=0, atol=1e-12)
        ref = torch.distributions.ContinuousBernoulli(logits=torch.tensor(l, dtype=torch.float64))
        assert torch.allclose(ours, ref.log_prob(x), rtol=0, atol=1e-9)


def test_continuous_bernoulli_mean_and_samples():
    cb = ContinuousBernoulli()
    for l in [-3.0, 1e-5, 2.0]:
        mean, _ = scipy.integrate.quad(lambda x, l=l: x * l * math.exp(l * x) / math.expm1(l), 0, 1)
        logits = torch.full((200000, 1), l, dtype=torch.float64)
        assert math.isclose(cb.mean(logits[:1]).item(), mean, abs_tol=1e-9)
        draws = cb.sample(logits, torch.Generator().manual_seed(0))
        assert abs(draws.mean().item() - mean) < 4 * 0.3 / math.sqrt(200000)


def test_gaussian_integrates_to_one_and_matches_torch():
    for scale in ("decoder", "learned"):
        g = Gaussian(scale, dim=2)
        with torch.no_grad():
            if scale == "learned":
                g.raw_log_scale.copy_(torch.tensor([-0.5, 1.0]))
        params = torch.tensor([[0.3, -1.0, -0.5, 1.0]], dtype=torch.float64)
        params = params if scale == "decoder" else params[:, :2]
        x = torch.tensor([[0.1, 2.0]], dtype=torch.float64)
        sigma = floored_log_scale(torch.tensor([-0.5, 1.0], dtype=torch.float64)).exp()
        ref = torch.distributions.Normal(torch.tensor([0.3, -1.0], dtype=torch.float64), sigma)
        assert torch.allclose(g.log_prob(params, x), ref.log_prob(x).sum(-1), rtol=0, atol=1e-6)
    one = Gaussian()
    params = torch.tensor([[0.2, -3.0]], dtype=torch.float64)

    def density(v):
        return math.exp(one.log_prob(params, torch.tensor([[v]], dtype=torch.float64)).item())

    total, _ = scipy.integrate.quad(density, -np.inf, np.inf)
    assert math.isclose(total, 1.0, rel_tol=1e-6)


def test_log_scale_floor():
    raw = torch.tensor([-50.0, LOG_SCALE_FLOOR, 0.0, 3.0], dtype=torch.float64)
    floored = floored_log_scale(raw)
    assert bool((floored >= LOG_SCALE_FLOOR).all())
    assert math.isclose(floored[0].item(), LOG_SCALE_FLOOR, abs_tol=1e-12)
    assert math.isclose(floored[3].item(), 3.0, abs_tol=1e-4)


CASES = [(0.0, -3.0), (-0.97, -1.0), (0.99, -6.0), (0.3, 2.0), (0.5, -12.0)]


@pytest.mark.parametrize("mu, raw", CASES)
def test_logistic_256_sums_to_one_over_the_levels_and_matches_scipy(mu, raw):
    lik = Logistic256()
    levels = torch.arange(256, dtype=torch.float64)[:, None] / 255
    params = torch.tensor([[mu, raw]], dtype=torch.float64).expand(256, 2)
    log_p = lik.log_prob(params, levels)
    assert math.isclose(torch.logsumexp(log_p, 0).exp().item(), 1.0, rel_tol=1e-9)
    s = floored_log_scale(torch.tensor(raw, dtype=torch.float64)).exp().item()
    c = 2 * levels[:, 0].numpy() - 1
    dist = scipy.stats.logistic(loc=mu, scale=s)
    up, lo = c + 1 / 255, c - 1 / 255  # the bin's edges; the edge bins reach to -inf, +inf
    below = np.where(c > 0.999, 1.0, dist.cdf(up)) - np.where(c < -0.999, 0.0, dist.cdf(lo))
    above = np.where(c < -0.999, 1.0, dist.sf(lo)) - np.where(c > 0.999, 0.0, dist.sf(up))
    ref = np.where(c < mu, below, above)  # each side's differences without cancellation
    ok = ref > 1e-300
    assert np.allclose(log_p.numpy()[ok], np.log(ref[ok]), rtol=1e-6, atol=1e-8)


def test_logistic_256_samples_are_levels_and_data_is_checked():
    lik = Logistic256()
    params = torch.tensor([[0.1, -2.0]]).expand(1000, 2)
    x = lik.sample(params, torch.Generator().manual_seed(0))
    assert torch.equal(x * 255, (x * 255).round()) and 0 <= x.min() and x.max() <= 1
    lik.check_data(x, "draws")
    with pytest.raises(Exception, match="256 levels"):
        lik.check_data(torch.tensor([[0.5]]), "grey")


def test_bits_per_dim_constant():
    assert math.isclose(bits_per_dim(784 * math.log(2.0), 784), 1.0)
    assert math.isclose(bits_per_dim(100.0, 784), 100.0 / 784 / 0.6931471805599453)


def test_names():
    for name in ("bernoulli", "continuous-bernoulli", "gaussian", "logistic-256"):
        assert get_likelihood(name).name == name
    with pytest.raises(Exception, match="unknown likelihood"):
        get_likelihood("poisson")
