"""The model's densities, shapes and initialization; evaluation metrics on known models."""

import math

import pytest
import torch
from torch import nn

from iwae.errors import IwaeError
from iwae.evaluate import (
    MAX_ROWS,
    MAX_ROWS_CUDA,
    active_units,
    default_max_rows,
    evaluate,
    log_weight_reductions,
    unit_activity,
)
from iwae.model import (
    FAST_TANH_MIN,
    VAE,
    ModelConfig,
    Tanh,
    bernoulli_log_prob,
    gaussian_log_prob,
    parse_hidden,
    parse_latent,
)


def test_presets_are_burda_architectures():
    def linear_shapes(module):
        return [tuple(m.weight.shape[::-1]) for m in module.modules() if isinstance(m, nn.Linear)]

    one = VAE(ModelConfig.preset(1))
    # q: 784-200-200-[50] (mean and scale heads); p: 50-200-200-784
    assert linear_shapes(one.encoder) == [(784, 200), (200, 200), (200, 50), (200, 50)]
    assert linear_shapes(one.decoder) == [(50, 200), (200, 200), (200, 784)]
    two = VAE(ModelConfig.preset(2))
    assert linear_shapes(two.encoder[0]) == [(784, 200), (200, 200), (200, 100), (200, 100)]
    assert linear_shapes(two.encoder[1]) == [(100, 100), (100, 100), (100, 50), (100, 50)]
    assert linear_shapes(two.decoder[1]) == [(50, 100), (100, 100), (100, 100), (100, 100)]
    assert linear_shapes(two.decoder[0]) == [(100, 200), (200, 200), (200, 784)]


def test_initialization():
    torch.manual_seed(0)
    mean = torch.rand(784) * 1.2 - 0.1  # some pixels outside (0.001, 0.999)
    model = VAE(ModelConfig.preset(2), pixel_mean=mean)
    expected = torch.logit(mean.clamp(0.001, 0.999))
    assert torch.allclose(model.output_layer.bias, expected)
    for name, p in model.named_parameters():
        if name.endswith("bias") and p is not model.output_layer.bias:
            assert torch.count_nonzero(p) == 0, name
        if name.endswith("weight"):
            fan_out, fan_in = p.shape
            limit = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform
            assert p.abs().max() <= limit and p.abs().max() > 0.9 * limit, name


def test_densities_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    h, mean, log_std = (torch.randn(4, 3, 5, generator=g) for _ in range(3))
    ref = torch.distributions.Normal(mean, log_std.exp()).log_prob(h).sum(-1)
    assert torch.allclose(gaussian_log_prob(h, mean, log_std), ref, atol=1e-5)
    logits = torch.randn(4, 3, 7, generator=g) * 30  # large logits: no log(sigmoid) underflow
    x = torch.bernoulli(torch.full((3, 7), 0.5), generator=g)
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    assert torch.allclose(bernoulli_log_prob(logits, x), ref, atol=1e-4)
    assert torch.isfinite(
        bernoulli_log_prob(torch.full((1, 2), 200.0), torch.tensor([0.0, 1.0]))
    ).all()


@pytest.mark.parametrize("scale", ["exp", "softplus"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_log_weights_is_log_joint_minus_log_q(layers, scale):
    config = ModelConfig(
        x_dim=12, latent=(6, 4, 3)[:layers], hidden=((8,), (7, 7), (5,))[:layers], scale=scale
    )
    model = VAE(config).double()
    x = torch.bernoulli(torch.full((5, 12), 0.4, dtype=torch.float64))
    lw = model.log_weights(x, 9, generator=torch.Generator().manual_seed(1))
    hs = model.sample_q(x, 9, generator=torch.Generator().manual_seed(1))
    assert lw.shape == (9, 5)
    assert [h.shape for h in hs] == [(9, 5, d) for d in config.latent]
    assert torch.allclose(lw, model.log_joint(x, hs) - model.log_q(hs, x))
    # the per-layer log-densities add up as the factorization says
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(hs[-1]).sum(-1)
    for l in range(1, layers):
        mean, log_std = model.decoder[l](hs[l])
        prior = prior + torch.distributions.Normal(mean, log_std.exp()).log_prob(hs[l - 1]).sum(-1)
    assert torch.allclose(model.log_prior(hs), prior)
    images = model.sample_images(4)
    assert images.shape == (4, 12) and (images >= 0).all() and (images <= 1).all()


def _linear_encoder_model(layers):
    """x in {0,1}^4; E_q[h_1] = (x_0, 0.1 x_1, 0), and for two layers E_q[h_2] = (h_1 unit 0, 0)."""
    model = VAE(ModelConfig(x_dim=4, latent=(3, 2)[:layers], hidden=((), ())[:layers])).double()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.zero_()
        model.encoder[0].mean.weight[0, 0] = 1.0
        model.encoder[0].mean.weight[1, 1] = 0.1
        model.encoder[0].scale.bias.fill_(math.log(0.5))
        if layers == 2:
            model.encoder[1].mean.weight[0, 0] = 1.0
            model.encoder[1].mean.bias[1] = 5.0  # constant: inactive however large
    return model


@pytest.mark.parametrize("layers", [1, 2])
def test_active_units_on_a_constructed_model(layers):
    model = _linear_encoder_model(layers)
    x = torch.bernoulli(
        torch.full((2000, 4), 0.5, dtype=torch.float64), generator=torch.Generator().manual_seed(0)
    )
    activity = unit_activity(model, x, n_samples=500)
    var0, var1 = x[:, 0].var(correction=0), x[:, 1].var(correction=0)
    assert torch.allclose(
        activity[0], torch.stack([var0, 0.01 * var1, torch.tensor(0.0, dtype=torch.float64)])
    )
    if layers == 2:
        # E_q[h_2 unit 0] = E_q[h_1 unit 0] = x_0 up to Monte Carlo error of 500 samples of std 0.5
        assert activity[1][0].item() == pytest.approx(var0.item(), rel=0.02)
        assert activity[1][1].item() < 1e-20
    assert active_units(model, x) == [1, 1][:layers]


def test_evaluation_chunks_by_device():
    """Chunks of 4096 rows on the CPU (the numbers of earlier evaluations there unchanged),
    of 65,536 on a GPU, where small chunks leave it launching small kernels."""
    assert (
        (default_max_rows("cpu"), default_max_rows(torch.device("cuda", 0)))
        == (MAX_ROWS, MAX_ROWS_CUDA)
        == (4096, 65536)
    )
    torch.manual_seed(0)
    model = VAE(ModelConfig(x_dim=10, latent=(3,), hidden=((16,),)))
    x = torch.bernoulli(torch.full((9, 10), 0.3))
    assert evaluate(model, x, k=5000, seed=2) == evaluate(
        model, x, k=5000, seed=2, max_rows=MAX_ROWS
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_evaluation_agrees_with_the_cpu_one():
    torch.manual_seed(0)
    model = VAE(ModelConfig(x_dim=10, latent=(3,), hidden=((16,),)))
    x = torch.bernoulli(torch.full((40, 10), 0.3))
    cpu = evaluate(model, x, k=5000, seed=2)
    gpu = evaluate(model.cuda(), x.cuda(), k=5000, seed=2)
    assert gpu == evaluate(model, x.cuda(), k=5000, seed=2, max_rows=MAX_ROWS_CUDA)
    assert gpu["nll"] == pytest.approx(
        cpu["nll"], abs=0.01
    )  # other samples, the same L_5000 within noise


def test_evaluation_is_deterministic_and_consistent():
    torch.manual_seed(0)
    model = VAE(ModelConfig(x_dim=10, latent=(3,), hidden=((16,),)))
    x = torch.bernoulli(torch.full((7, 10), 0.3))
    a = evaluate(model, x, k=300, seed=4, max_rows=64)
    b = evaluate(model, x, k=300, seed=4, max_rows=64)
    assert a == b
    assert set(a) == {
        "nll",
        "nll_stderr",
        "iwae64",
        "log_px",
        "neg_kl_q_p",
        "elbo",
        "active_units",
        "n_test",
        "k",
    }
    assert a["log_px"] == -a["nll"]
    assert a["neg_kl_q_p"] == pytest.approx(a["iwae64"] - a["log_px"])
    assert a["elbo"] < a["iwae64"] < a["log_px"]
    # the streamed reductions equal the bounds of the same samples computed in one piece
    r = log_weight_reductions(model, x, k=300, k_small=64, seed=9, max_rows=100)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        pieces = [
            model.log_weights(x[i : i + 1], 100, generator=g) for i in range(7) for _ in range(3)
        ]
    lw = torch.cat([torch.cat(pieces[3 * i : 3 * i + 3], 0) for i in range(7)], 1)  # [300, 7]
    assert torch.allclose(r["log_px"], torch.logsumexp(lw, 0) - math.log(300), atol=1e-5)
    assert torch.allclose(r["small"], torch.logsumexp(lw[:64], 0) - math.log(64), atol=1e-5)
    assert torch.allclose(r["elbo"], lw.mean(0), atol=1e-5)


def test_fast_tanh_matches_torch_tanh_in_value_and_gradient():
    tanh = Tanh()
    x = torch.cat(
        [
            torch.linspace(-30, 30, 100_001),
            torch.randn(FAST_TANH_MIN) * 1e-4,
            torch.randn(FAST_TANH_MIN) * 3,
        ]
    )
    assert x.numel() >= FAST_TANH_MIN
    exact = torch.tanh(x.double())
    with torch.no_grad():
        assert (tanh(x).double() - exact).abs().max() < 3e-7
    xg = x.clone().requires_grad_()
    y = tanh(xg)
    assert (y.detach().double() - exact).abs().max() < 3e-7
    g = torch.randn_like(x)
    (grad,) = torch.autograd.grad(y, xg, g)
    error = (grad.double() - g.double() * (1 - exact**2)).abs() / g.double().abs().clamp(min=1e-3)
    assert error.max() < 1e-6  # relative to the incoming gradient: 2|y| * 2e-7 plus rounding
    # the analytic backward is the derivative of the forward (float64, finite differences)
    small = torch.randn(FAST_TANH_MIN + 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tanh(t)[:5] * 1.0, (small,), fast_mode=True)
    # small tensors are torch.tanh itself, bit for bit
    s = torch.randn(100)
    assert torch.equal(tanh(s), torch.tanh(s))


def test_architectures_from_text():
    assert parse_latent("100,50") == (100, 50) and parse_latent(" 7 ") == (7,)
    assert parse_hidden("200x200,100x100") == ((200, 200), (100, 100)) and parse_hidden("5") == (
        (5,),
    )
    for text in ("", "0", "-3", "a", "100,,50", "1.5", "100;50"):
        with pytest.raises(IwaeError, match="--latent"):
            parse_latent(text)
    for text in ("", "200x", "x200", "200x0", "200*200", "200x200,"):
        with pytest.raises(IwaeError, match="--hidden"):
            parse_hidden(text)
