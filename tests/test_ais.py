"""AIS and BDMC against exact values: quadrature on a 2-latent model, a Gaussian target with
known moments, and the identities at T = 1."""

import math

import pytest
import torch
from tiny import exact_log_px, fit_encoder, tiny_data, tiny_model

from iwae.ais import (
    Point,
    StepSize,
    bdmc,
    forward_ais,
    hmc_transition,
    reverse_ais,
    sigmoid_schedule,
    simulate,
)
from iwae.bounds import iwae
from iwae.errors import IwaeError


def test_sigmoid_schedule():
    assert sigmoid_schedule(1).tolist() == [0.0, 1.0]
    beta = sigmoid_schedule(10)
    assert beta[0] == 0.0 and beta[-1] == 1.0 and len(beta) == 11
    assert (beta[1:] > beta[:-1]).all()
    assert torch.allclose(
        beta + beta.flip(0), torch.ones(11, dtype=torch.float64), atol=1e-15
    )  # symmetric
    # smaller steps at the ends than in the middle
    # (delta = 4: s(-4 + 0.8) - s(-4) = 0.0218 of 0.9640)
    steps = beta.diff()
    assert steps[0] < steps[5] / 5
    assert steps[0].item() == pytest.approx(
        (torch.sigmoid(torch.tensor(-3.2)) - torch.sigmoid(torch.tensor(-4.0))).item()
        / (1 - 2 * torch.sigmoid(torch.tensor(-4.0)).item()),
        rel=1e-6,
    )
    with pytest.raises(IwaeError):
        sigmoid_schedule(0)


# -- the HMC kernel ----------------------------------------------------------------------------

MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)


def _gaussian(h):
    """N(MU, diag SIGMA^2) up to its constant: log f and its gradient."""
    z = (h - MU) / SIGMA
    return Point(h, -0.5 * z.square().sum(-1), -z / SIGMA)


def test_hmc_leaves_a_gaussian_invariant():
    """Chains started far from N(mu, diag sigma^2) (all at 0) reach its mean and variance:
    with a step of 1.1 sigma_min the leapfrog alone is far off (the Metropolis correction
    matters)."""
    chains = 4000
    g = torch.Generator().manual_seed(0)
    point = _gaussian(torch.zeros(chains, 1, 3, dtype=torch.float64))
    eps = torch.tensor(0.55, dtype=torch.float64)
    accepted = []
    for _ in range(150):
        point, accept = hmc_transition(point, _gaussian, eps, 3, g)
        accepted.append(accept.mean().item())
    h = point.h[:, 0]
    mean, var = h.mean(0), h.var(0)
    se_mean = SIGMA / math.sqrt(chains)
    se_var = SIGMA**2 * math.sqrt(2 / (chains - 1))
    assert ((mean - MU).abs() < 4 * se_mean).all(), (mean, MU)
    assert ((var - SIGMA**2).abs() < 4 * se_var).all(), (var, SIGMA**2)
    assert 0.2 < sum(accepted[50:]) / 100 < 0.95  # really rejects, really moves


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_hmc_rejects_non_finite_proposals(value):
    def broken(h):  # a density of nan or +inf (whose energy -inf would look like a certain accept)
        return Point(h, torch.full(h.shape[:2], value, dtype=h.dtype), torch.zeros_like(h))

    start = _gaussian(torch.zeros(5, 2, 3, dtype=torch.float64))
    end, accept = hmc_transition(
        start, broken, torch.tensor(0.1, dtype=torch.float64), 2, torch.Generator()
    )
    assert torch.equal(end.h, start.h) and (accept == 0).all()


def test_step_size_adapts_towards_the_target_acceptance():
    step = StepSize(2, torch.zeros(1), initial=0.1, target=0.65)
    for _ in range(10):
        step.update(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # image 0 always accepts, image 1 never
    assert step.value[0].item() == pytest.approx(0.1 * 1.02**10, rel=1e-6)
    assert step.value[1].item() == pytest.approx(0.1 / 1.02**10, rel=1e-6)
    fixed = StepSize(2, torch.zeros(1), initial=0.1, adapt=False)
    fixed.update(torch.ones(3, 2))
    assert fixed.value.tolist() == pytest.approx([0.1, 0.1])


# -- AIS on the tiny model -----------------------------------------------------------------------


@pytest.mark.parametrize("latent, hidden", [((2,), ((8,),)), ((3, 2), ((5,), (4,)))])
def test_ais_with_one_step_from_q_is_importance_sampling(latent, hidden):
    """T = 1: no transition, one weight p(x, h_0) / q(h_0 | x) per chain on the draws that
    model.log_weights makes from the same seed; log p-hat = L_C."""
    model, x = tiny_model(latent=latent, hidden=hidden), tiny_data()
    r = forward_ais(model, x, steps=1, chains=7, seed=3)
    with torch.no_grad():
        log_w = model.log_weights(x, 7, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(r["log_w"], log_w, atol=1e-12, rtol=0)
    assert torch.allclose(r["log_px"], iwae(log_w), atol=1e-12, rtol=0)
    assert torch.isnan(r["acceptance"]).all()  # no transition was made
    assert all(p.requires_grad for p in model.parameters())  # frozen only while AIS ran


def test_reverse_ais_with_one_step_is_the_harmonic_mean():
    """T = 1 backwards: w_rev = q(h | x) / p(x, h) at the given latents, upper = -log mean w_rev."""
    model, x = tiny_model(latent=(3, 2), hidden=((5,), (4,))), tiny_data()
    latents = [
        torch.randn(x.shape[0], d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
        for d in (3, 2)
    ]
    r = reverse_ais(model, x, latents, steps=1, chains=3)
    with torch.no_grad():
        hs = [h.unsqueeze(0) for h in latents]
        log_w_rev = model.log_q(hs, x) - model.log_joint(x, hs)  # [1, B]
    assert torch.allclose(r["log_w"], log_w_rev.expand(3, -1), atol=1e-12, rtol=0)
    assert torch.allclose(r["log_px"], -log_w_rev[0], atol=1e-12, rtol=0)


def test_chunks_do_not_change_an_images_chains():
    """Images are annealed chunk by chunk (max_rows bounds the rows alive at once): the first
    image's chains are the same whether its chunk holds it alone or all images."""
    model, x = tiny_model(), tiny_data(n=5)
    alone = forward_ais(model, x[:1], steps=4, chains=3, leapfrog_steps=2, seed=1)
    chunked = forward_ais(model, x, steps=4, chains=3, leapfrog_steps=2, seed=1, max_rows=3)
    assert torch.equal(alone["log_w"][:, 0], chunked["log_w"][:, 0])
    assert chunked["log_w"].shape == (3, 5) and torch.isfinite(chunked["log_w"]).all()


@pytest.mark.parametrize(
    "init, steps", [("q", 150), pytest.param("prior", 600, marks=pytest.mark.slow)]
)
def test_ais_matches_quadrature(init, steps):
    """With enough steps AIS is within 0.05 nats of log p(x) by quadrature, image by image,
    where IS with as many samples (T = 1) is not. (From the prior, far from the posterior,
    it needs more steps.)"""
    x = tiny_data(n=6)
    model = fit_encoder(tiny_model(), x)
    exact = exact_log_px(model, x)
    r = forward_ais(model, x, steps=steps, chains=64, leapfrog_steps=5, init=init, seed=0)
    assert (r["log_px"] - exact).abs().max() < 0.05, r["log_px"] - exact
    assert 0.5 < r["acceptance"].mean() < 1.0
    short = forward_ais(model, x, steps=1, chains=64, init=init, seed=0)
    assert (short["log_px"] - exact).abs().max() > 0.1


def test_bdmc_sandwich_contains_log_px():
    """On images simulated from the model, forward AIS lies below log p(x) and reverse AIS
    from the exact latents above it (means over 30 images): far apart with T = 2, and with
    T = 150 both within 0.03 nats of log p(x) by quadrature, on either side of it up to the
    noise of 32 chains (0.01 nats)."""
    model = fit_encoder(tiny_model(), tiny_data(n=6))
    n, seed = 30, 4
    result = bdmc(model, n, steps=[2, 150], chains=32, leapfrog_steps=5, seed=seed)
    x, _ = simulate(model, n, torch.Generator().manual_seed(seed))
    unique, inverse = torch.unique(x, dim=0, return_inverse=True)  # 6 binary pixels: many repeats
    exact = exact_log_px(model, unique)[inverse].mean().item()
    lower, upper = result["per_image"]["lower"], result["per_image"]["upper"]
    assert lower.shape == upper.shape == (2, n)
    assert result["upper"][0] > exact + 0.5 and result["gap"][0] > 0.5
    assert exact - 0.03 < result["lower"][1] < exact + 0.01
    assert exact - 0.01 < result["upper"][1] < exact + 0.03
    assert abs(result["gap"][1]) < 0.03
    assert result["gap"][1] == pytest.approx((upper[1] - lower[1]).double().mean().item())
    assert result["lower"][0] == pytest.approx(lower[0].double().mean().item())
    assert result["steps"] == [2, 150] and len(result["seconds"]) == 2


def test_invalid_settings_are_errors():
    model, x = tiny_model(), tiny_data()
    for bad in [dict(steps=0), dict(chains=0), dict(leapfrog_steps=0), dict(init="uniform")]:
        with pytest.raises(IwaeError):
            forward_ais(model, x, **{"steps": 2, "chains": 2, **bad})
