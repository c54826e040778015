"""The bounds against exact values: closed forms, quadrature, and known identities."""

import math

import pytest
import torch
from tiny import exact_log_px, fit_encoder, tiny_data, tiny_model

from iwae.bounds import Objective, ciwae, elbo, iwae, miwae
from iwae.errors import IwaeError

# -- closed forms and identities on log-weight tensors ----------------------------------


def test_bounds_on_known_weights():
    log_w = torch.log(torch.tensor([[1.0], [2.0], [3.0], [6.0]], dtype=torch.float64))
    assert iwae(log_w).item() == pytest.approx(math.log(3.0))
    assert elbo(log_w).item() == pytest.approx(math.log(36.0) / 4)
    # MIWAE(2, 2): groups {1, 2} and {3, 6}
    assert miwae(log_w, 2).item() == pytest.approx((math.log(1.5) + math.log(4.5)) / 2)
    assert ciwae(log_w, 0.25).item() == pytest.approx(
        0.25 * math.log(36.0) / 4 + 0.75 * math.log(3.0)
    )


def test_iwae_is_stable_for_tiny_weights():
    log_w = torch.full((5000, 3), -1e4)
    assert torch.allclose(iwae(log_w), torch.full((3,), -1e4))


@pytest.fixture
def log_w():
    return torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3


def test_identities(log_w):
    assert torch.allclose(iwae(log_w[:1]), elbo(log_w[:1]))  # L_1 = VAE bound
    assert torch.allclose(miwae(log_w, 1), iwae(log_w))  # MIWAE(1, K) = IWAE_K
    assert torch.allclose(miwae(log_w, 12), elbo(log_w))  # MIWAE(M, 1) = VAE
    assert torch.allclose(ciwae(log_w, 1.0), elbo(log_w))
    assert torch.allclose(ciwae(log_w, 0.0), iwae(log_w))
    # and the orderings that hold sample by sample: VAE <= MIWAE(M, K) <= IWAE_{MK}
    assert (elbo(log_w) <= miwae(log_w, 3) + 1e-12).all()
    assert (miwae(log_w, 3) <= iwae(log_w) + 1e-12).all()


def test_miwae_groups_are_contiguous_blocks_of_k(log_w):
    m, k = 3, 4
    expected = torch.stack([iwae(log_w[g * k : (g + 1) * k]) for g in range(m)]).mean(0)
    assert torch.allclose(miwae(log_w, m), expected)


def test_objective_validation():
    for bad in [
        dict(name="elbo"),
        dict(k=0),
        dict(m=0),
        dict(beta=1.5),
        dict(beta=-0.1),
        dict(name="iwae", m=2),
    ]:
        with pytest.raises(IwaeError):
            Objective(**{"name": "miwae", "k": 2, **bad})
    assert Objective("piwae", k=16, m=4).samples == 64


# -- the model's bounds against exact log p(x) -------------------------------------------


def test_l5000_matches_quadrature():
    """On a 2-D latent model, L_5000 is within 0.1 nats of log p(x) and not above it on average."""
    x = tiny_data(n=6)
    model = fit_encoder(tiny_model(), x)
    exact = exact_log_px(model, x)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        estimates = torch.stack(
            [iwae(model.log_weights(x, 5000, generator=g)) for _ in range(20)]
        )  # [20, B]
    mean = estimates.mean(0)
    stderr = estimates.std(0) / math.sqrt(estimates.shape[0])
    assert (mean - exact).abs().max() < 0.1
    assert (mean - exact <= 3 * stderr + 1e-6).all(), (mean - exact, stderr)
    # the loose bounds lie clearly below
    with torch.no_grad():
        lw = model.log_weights(x, 5000, generator=g)
    assert (elbo(lw) < exact - 0.05).all()


def test_lk_increases_with_k():
    """Theorem 1 of Burda et al.: E[L_k] is non-decreasing in k, and L_1 is the ELBO."""
    model, x = tiny_model(seed=3), tiny_data(n=3, seed=4)
    exact = exact_log_px(model, x)
    g = torch.Generator().manual_seed(1)
    ks, reps = [1, 2, 5, 20, 100], 4000
    means, errs = [], []
    with torch.no_grad():
        for k in ks:
            lw = model.log_weights(x.repeat(reps, 1), k, generator=g).reshape(k, reps, -1)
            lk = torch.logsumexp(lw, 0) - math.log(k)  # [reps, B]
            means.append(lk.mean(0))
            errs.append(lk.std(0) / math.sqrt(reps))
            if k == 1:
                assert torch.equal(lk, elbo(lw))
    for a, b, ea, eb in zip(means, means[1:], errs, errs[1:]):
        assert (b > a - 3 * torch.sqrt(ea**2 + eb**2)).all()
    assert (means[-1] > means[0] + 0.05).all()  # it really rises on this model
    assert (means[-1] <= exact + 3 * errs[-1]).all()


# -- gradients ----------------------------------------------------------------------------


def _grads(model, loss):
    params = list(model.parameters())
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def _log_w(model, x, s, seed=5):
    return model.log_weights(x, s, generator=torch.Generator().manual_seed(seed))


def test_iwae_gradient_is_self_normalized_sum():
    """grad L_k = sum_i w~_i grad log w_i with w~_i = w_i / sum_j w_j."""
    model, x = tiny_model(latent=(3, 2), hidden=((5,), (4,))), tiny_data()
    lw = _log_w(model, x, 7)
    g_bound = _grads(model, iwae(lw).sum())
    w_tilde = torch.softmax(lw.detach(), 0)
    g_sum = _grads(model, (w_tilde * lw).sum())
    for a, b in zip(g_bound, g_sum):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("layers", [((2,), ((8,),)), ((3, 2), ((5,), (4,)))])
def test_piwae_routes_each_bound_to_its_network(layers):
    latent, hidden = layers
    model, x = tiny_model(latent=latent, hidden=hidden), tiny_data()
    m, k = 2, 3
    enc, dec = model.encoder_parameters(), model.decoder_parameters()

    def grads_of(bound, params):
        return torch.autograd.grad(bound(_log_w(model, x, m * k)).mean(), params)

    want_enc = grads_of(lambda lw: miwae(lw, m), enc)
    want_dec = grads_of(iwae, dec)
    model.zero_grad()
    value = Objective("piwae", k=k, m=m).backward(_log_w(model, x, m * k), enc, dec)
    assert value.item() == pytest.approx(iwae(_log_w(model, x, m * k)).mean().item())
    for p, g in zip(enc, want_enc):
        assert torch.allclose(p.grad, -g, atol=1e-12)
    for p, g in zip(dec, want_dec):
        assert torch.allclose(p.grad, -g, atol=1e-12)

    # The test can fail: the encoder gradients of IWAE(MK) and of MIWAE(K, M) differ from
    # MIWAE(M, K) here, and so do the decoder gradients of MIWAE(M, K) from IWAE(MK).
    def differs(a, b):
        return any(not torch.allclose(u, v, atol=1e-8) for u, v in zip(a, b))

    assert differs(want_enc, grads_of(iwae, enc))
    assert differs(want_enc, grads_of(lambda lw: miwae(lw, k), enc))
    assert differs(want_dec, grads_of(lambda lw: miwae(lw, m), dec))


@pytest.mark.parametrize("name", ["vae", "iwae", "miwae", "ciwae"])
def test_single_bound_objectives_descend_their_bound(name):
    model, x = tiny_model(), tiny_data()
    obj = Objective(name, k=3, m=2 if name == "miwae" else 1, beta=0.3)
    want = _grads(model, -obj.bound(_log_w(model, x, obj.samples)).mean())
    model.zero_grad()
    obj.backward(
        _log_w(model, x, obj.samples), model.encoder_parameters(), model.decoder_parameters()
    )
    for p, g in zip(model.parameters(), want):
        assert torch.allclose(p.grad, g, atol=1e-12)
