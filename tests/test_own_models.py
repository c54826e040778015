"""Models and bounds of your own: the protocol, ModuleVAE, Bound, and bounds loaded from files."""

import functools
import math
from pathlib import Path

import pytest
import torch
from tiny import exact_log_px, fit_encoder, tiny_data, tiny_model
from torch import nn

from iwae.ais import bdmc, forward_ais
from iwae.bounds import Bound, Objective, dreg_surrogate, elbo, iwae
from iwae.errors import IwaeError
from iwae.evaluate import active_units, evaluate
from iwae.latent import LatentVariableModel, ModuleVAE
from iwae.user_code import as_bound, is_code_spec, load_bound

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def as_module_vae(vae) -> ModuleVAE:
    """The same networks as a Burda VAE, handed to ModuleVAE as a user's modules."""
    return ModuleVAE(
        list(vae.encoder), vae.decoder[0], vae.config.latent, priors=list(vae.decoder[1:])
    )


@pytest.mark.parametrize("latent, hidden", [((2,), ((8,),)), ((3, 2), ((8,), (5,)))])
def test_module_vae_computes_what_the_vae_computes(latent, hidden):
    vae = tiny_model(latent=latent, hidden=hidden)
    own = as_module_vae(vae)
    assert isinstance(vae, LatentVariableModel) and isinstance(own, LatentVariableModel)
    x = tiny_data()
    for stop_q in (False, True):
        a = vae.log_weights(x, 5, torch.Generator().manual_seed(3), stop_q=stop_q)
        b = own.log_weights(x, 5, torch.Generator().manual_seed(3), stop_q=stop_q)
        assert torch.equal(a, b)
    assert [p.data_ptr() for p in own.encoder_parameters()] == [
        p.data_ptr() for p in vae.encoder_parameters()
    ]
    assert {p.data_ptr() for p in own.decoder_parameters()} == {
        p.data_ptr() for p in vae.decoder_parameters()
    }
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for p, q in zip(vae.sample_prior(7, g1), own.sample_prior(7, g2)):
        assert torch.equal(p, q)


class ConvEncoder(nn.Module):
    """x [N, 36] as 6x6 images -> (mean, log sigma) of a 2-D latent."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1, dtype=torch.float64)
        self.out = nn.Linear(4 * 3 * 3, 4, dtype=torch.float64)

    def forward(self, x):
        a = torch.tanh(self.conv(x.view(-1, 1, 6, 6))).flatten(1)
        return self.out(a).chunk(2, -1)


class ConvDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, 4 * 3 * 3, dtype=torch.float64)
        self.deconv = nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1, dtype=torch.float64)

    def forward(self, h):
        a = torch.tanh(self.inp(h)).view(-1, 4, 3, 3)
        return 3.0 * self.deconv(a).flatten(1)


@pytest.fixture(scope="module")
def fitted_conv():
    """A conv model with its encoder fitted to three 6x6 images, and log p(x) by quadrature."""
    torch.manual_seed(0)
    model, x = ModuleVAE(ConvEncoder(), ConvDecoder(), latent=2), tiny_data(n=3, x_dim=36)
    fit_encoder(model, x)
    return model, x, exact_log_px(model, x, step=0.05)


def test_conv_model_bounds_approach_quadrature(fitted_conv):
    """L_k of a conv model with a 2-D latent, below log p(x) by quadrature, reaches it."""
    model, x, exact = fitted_conv
    with torch.no_grad():
        log_w = model.log_weights(x, 20000, torch.Generator().manual_seed(2))
    assert bool((elbo(log_w) < exact).all())  # E[L_1] = the ELBO, below log p(x)
    assert torch.allclose(iwae(log_w), exact, atol=0.02)


def test_conv_model_evaluates_and_runs_ais(fitted_conv):
    model, x, exact = fitted_conv
    result = evaluate(model, x, k=2000)
    assert abs(result["log_px"] - exact.mean().item()) < 0.05
    assert len(active_units(model, x)) == 1
    ais = forward_ais(model, x, steps=50, chains=8, seed=0)
    assert torch.allclose(ais["log_px"].double(), exact, atol=0.05)
    sim = bdmc(model, n=4, steps=[50], chains=8, seed=1)
    assert sim["gap"][0] < 0.2 and sim["lower"][0] < sim["upper"][0] + 0.05


def test_custom_bound_trains_like_the_builtin_one():
    """Objective(custom=Bound(iwae)) gives the built-in IWAE gradient, bit for bit."""
    x = tiny_data()
    grads = []
    for objective in (Objective("iwae", k=5), Objective(custom=Bound(iwae, "mine", samples=5))):
        model = tiny_model()
        log_w = objective.log_weights(model, x, torch.Generator().manual_seed(5))
        objective.backward(log_w, model.encoder_parameters(), model.decoder_parameters())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert str(Objective(custom=Bound(iwae, "mine", samples=5))) == "mine(k=5)"


def test_custom_bound_with_surrogate_routes_the_encoder_gradient():
    """A Bound with the DReG surrogate gives the built-in IWAE DReG gradient."""
    x = tiny_data()
    mine = Objective(custom=Bound(iwae, "mine", 5, surrogate=dreg_surrogate), estimator="dreg")
    grads = []
    for objective in (Objective("iwae", k=5, estimator="dreg"), mine):
        model = tiny_model()
        log_w = objective.log_weights(model, x, torch.Generator().manual_seed(6))
        objective.backward(log_w, model.encoder_parameters(), model.decoder_parameters())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(*grads))
    with pytest.raises(IwaeError, match="surrogate"):
        Objective(custom=Bound(iwae, "plain", 5), estimator="dreg")


def test_renyi_example_lies_between_elbo_and_iwae():
    bound, _ = load_bound(f"{EXAMPLES / 'renyi.py'}:bound", {"alpha": 0.0})
    log_w = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(bound.fn(log_w), iwae(log_w), rtol=0, atol=1e-12)
    half, _ = load_bound(f"{EXAMPLES / 'renyi.py'}:bound", {"alpha": 0.5})
    assert bool((elbo(log_w) <= half.fn(log_w)).all() and (half.fn(log_w) <= iwae(log_w)).all())
    near_one, _ = load_bound(f"{EXAMPLES / 'renyi.py'}:bound", {"alpha": 0.999999})
    assert torch.allclose(near_one.fn(log_w), elbo(log_w), atol=1e-4)
    assert half.name == "bound(alpha=0.5)"


def test_bound_from_a_file_is_hashed_and_a_changed_file_refused(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("import torch\ndef lse(log_w):\n    return torch.logsumexp(log_w, 0)\n")
    bound, loaded = load_bound(f"{path}:lse")
    assert loaded.path == str(path.resolve()) and len(loaded.sha256) == 64
    assert bound.name == "lse" and is_code_spec(f"{path}:lse") and not is_code_spec("iwae")
    load_bound(f"{path}:lse", sha256=loaded.sha256)  # unchanged: loads
    path.write_text(path.read_text() + "# edited\n")
    with pytest.raises(IwaeError, match=f"{path.resolve()}.*has changed"):
        load_bound(f"{path}:lse", sha256=loaded.sha256)
    with pytest.raises(IwaeError, match="has no 'nothing'.*lse"):
        load_bound(f"{path}:nothing")
    with pytest.raises(IwaeError, match="does not exist"):
        load_bound(f"{tmp_path / 'absent.py'}:lse")


def test_bound_from_a_module():
    bound, loaded = load_bound("iwae.bounds:elbo")
    log_w = torch.randn(3, 2)
    assert torch.equal(bound.fn(log_w), elbo(log_w)) and loaded.sha256 is not None
    with pytest.raises(IwaeError, match="cannot import"):
        load_bound("no_such_module_here:fn")


def test_a_ready_bound_object_in_a_file(tmp_path):
    path = tmp_path / "ready.py"
    path.write_text(
        "from iwae.bounds import Bound, iwae\nMINE = Bound(iwae, 'my-iwae', samples=3)\n"
    )
    bound, _ = load_bound(f"{path}:MINE")
    assert bound.name == "my-iwae" and bound.samples == 3
    assert Objective(custom=bound, k=50).k == 3
    with pytest.raises(IwaeError, match="takes no --objective-param"):
        load_bound(f"{path}:MINE", {"alpha": 1})


def test_partial_params_reach_the_function():
    def scaled(log_w, c=1.0):
        return c * iwae(log_w)

    b = as_bound(scaled, "scaled", {"c": 2.0})
    log_w = torch.randn(4, 3)
    assert torch.equal(b.fn(log_w), 2.0 * iwae(log_w)) and isinstance(b.fn, functools.partial)
    assert math.isclose(float(b.fn(torch.zeros(1, 1))), 0.0)
