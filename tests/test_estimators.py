"""Gradient estimators (reparam, STL, DReG) and the gradient SNR.

Unbiasedness is checked statistically: the batch of x is copied ``copies`` times, so one
backward pass gives the mean of ``copies`` independent gradient estimates; ``groups`` such
passes give independent group means, whose spread yields a standard error (the method of
batch means). Two estimators are run on the same samples and their paired difference is
tested per parameter against a t quantile with a Bonferroni correction.
"""

import json
import math
import subprocess
import sys

import pytest
import torch
from scipy import stats
from tiny import tiny_data, tiny_model

from iwae.bounds import ESTIMATORS, Objective, miwae
from iwae.cli import build_parser, main
from iwae.errors import IwaeError
from iwae.evaluate import gradient_snr, gradient_snr_curve, loglog_slope
from iwae.model import VAE, ModelConfig, gaussian_log_prob
from iwae.train import TrainConfig, save_weights, write_json


def gradients(model, x, objective, seed):
    """(encoder gradient, decoder gradient, returned value) of ``objective.backward`` with
    samples from ``seed``."""
    model.zero_grad(set_to_none=True)
    log_w = objective.log_weights(model, x, torch.Generator().manual_seed(seed))
    value = objective.backward(log_w, model.encoder_parameters(), model.decoder_parameters())
    flat = [
        torch.cat([p.grad.reshape(-1) for p in ps])
        for ps in (model.encoder_parameters(), model.decoder_parameters())
    ]
    return flat[0], flat[1], value


def paired_z(model, x, a: Objective, b: Objective, groups=30, copies=400):
    """Per encoder parameter, t statistic of E[grad_a - grad_b] (same samples for both), and
    its critical value."""
    xs = x.repeat(copies, 1)
    diffs = torch.stack(
        [gradients(model, xs, a, g)[0] - gradients(model, xs, b, g)[0] for g in range(groups)]
    )
    mean, se = diffs.mean(0), diffs.std(0) / math.sqrt(groups)
    z = torch.where(se > 0, mean / se, torch.zeros_like(mean))
    critical = stats.t.ppf(1 - 1e-3 / (2 * z.numel()), df=groups - 1)  # family-wise error 0.1%
    return z.abs(), critical


# -- unbiasedness --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,k,m", [("iwae", 5, 1), ("miwae", 3, 2), ("ciwae", 5, 1), ("piwae", 3, 2), ("vae", 3, 1)]
)
def test_dreg_encoder_gradient_is_unbiased(name, k, m):
    model, x = tiny_model(), tiny_data(n=3)
    z, critical = paired_z(
        model, x, Objective(name, k, m, 0.3, "dreg"), Objective(name, k, m, 0.3, "reparam")
    )
    assert z.max() < critical, (z.max().item(), critical)


def test_dreg_is_unbiased_with_two_stochastic_layers():
    model, x = tiny_model(latent=(3, 2), hidden=((5,), (4,))), tiny_data(n=3)
    z, critical = paired_z(model, x, Objective("iwae", 5, estimator="dreg"), Objective("iwae", 5))
    assert z.max() < critical, (z.max().item(), critical)


def test_two_layer_test_detects_a_dreg_that_cuts_the_path_through_q_inputs(monkeypatch):
    """The hierarchical test has power: detaching h_{l-1} inside q(h_l | h_{l-1}) biases DReG."""

    def cut(self, hs, x):
        total = 0.0
        for layer, u, h in zip(self.encoder, [x, *hs[:-1]], hs):
            fixed = {n: p.detach() for n, p in layer.named_parameters()}
            mean, log_std = torch.func.functional_call(layer, fixed, (u.detach(),))
            total = total + gaussian_log_prob(h, mean, log_std)
        return total

    monkeypatch.setattr(VAE, "log_q_stopped", cut)
    model, x = tiny_model(latent=(3, 2), hidden=((5,), (4,))), tiny_data(n=3)
    z, critical = paired_z(
        model, x, Objective("iwae", 5, estimator="dreg"), Objective("iwae", 5), copies=1000
    )
    assert z.max() > critical, (z.max().item(), critical)


def test_stl_is_unbiased_for_k1_and_biased_for_k_above_1():
    model, x = tiny_model(), tiny_data(n=3)
    z, critical = paired_z(model, x, Objective("iwae", 1, estimator="stl"), Objective("iwae", 1))
    assert z.max() < critical, (z.max().item(), critical)
    z, critical = paired_z(model, x, Objective("iwae", 10, estimator="stl"), Objective("iwae", 10))
    assert z.max() > critical, (z.max().item(), critical)


# -- exact properties on the same samples --------------------------------------------------


@pytest.mark.parametrize(
    "name,k,m", [("vae", 3, 1), ("iwae", 4, 1), ("miwae", 2, 3), ("ciwae", 4, 1), ("piwae", 2, 3)]
)
@pytest.mark.parametrize("layers", [((2,), ((8,),)), ((3, 2), ((5,), (4,)))])
def test_decoder_gradient_and_bound_value_do_not_depend_on_the_estimator(name, k, m, layers):
    model, x = tiny_model(latent=layers[0], hidden=layers[1]), tiny_data(n=3)
    results = {e: gradients(model, x, Objective(name, k, m, 0.3, e), seed=7) for e in ESTIMATORS}
    _, dec, value = results["reparam"]
    for e in ("stl", "dreg"):
        assert torch.equal(results[e][1], dec), e
        assert torch.equal(results[e][2], value), e
    if name != "vae":  # and the encoder gradients do differ
        assert not torch.allclose(results["dreg"][0], results["reparam"][0])


def test_stopped_log_weights_have_the_same_values():
    model, x = tiny_model(latent=(3, 2), hidden=((5,), (4,))), tiny_data(n=3)
    a = model.log_weights(x, 6, torch.Generator().manual_seed(3))
    b = model.log_weights(x, 6, torch.Generator().manual_seed(3), stop_q=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["miwae", "piwae"])
def test_dreg_normalizes_weights_within_each_group(name):
    m, k = 3, 4
    model, x = tiny_model(), tiny_data(n=3)
    enc = model.encoder_parameters()
    got = gradients(model, x, Objective(name, k, m, estimator="dreg"), seed=11)[0]

    def surrogate_grad(normalize_within_groups):
        lw = model.log_weights(x, m * k, torch.Generator().manual_seed(11), stop_q=True)
        if normalize_within_groups:
            w = torch.cat([torch.softmax(lw[g * k : (g + 1) * k].detach(), 0) for g in range(m)])
            w2 = w.square()
        else:
            w2 = torch.softmax(lw.detach(), 0).square()
        loss = -((w2 * lw).sum(0) / m).mean()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, enc)])

    assert torch.allclose(got, surrogate_grad(True), atol=1e-12)
    assert not torch.allclose(got, surrogate_grad(False), atol=1e-6)


def test_reparam_path_is_the_bound_gradient():
    """The default estimator still differentiates the bound itself."""
    model, x = tiny_model(), tiny_data(n=3)
    lw = model.log_weights(x, 6, torch.Generator().manual_seed(2))
    want = torch.autograd.grad(-miwae(lw, 2).mean(), model.encoder_parameters())
    got = gradients(model, x, Objective("miwae", 3, 2), seed=2)[0]
    assert torch.allclose(got, torch.cat([g.reshape(-1) for g in want]), atol=1e-12)


def test_estimator_validation_and_names():
    with pytest.raises(IwaeError):
        Objective("iwae", 5, estimator="reinforce")
    assert str(Objective("iwae", 5, estimator="dreg")) == "IWAE(k=5) DREG"
    assert str(Objective("iwae", 5)) == "IWAE(k=5)"

    assert TrainConfig(estimator="dreg", k=5).objective_spec.estimator == "dreg"
    with pytest.raises(IwaeError):
        TrainConfig(estimator="nope")


# -- SNR ---------------------------------------------------------------------------------


def test_gradient_snr_matches_direct_computation():
    model, x = tiny_model(), tiny_data(n=3)
    objective, reps = Objective("iwae", 5), 30
    got = gradient_snr(model, x, objective, reps=reps, seed=4)
    g = torch.Generator().manual_seed(4)
    grads = {"encoder": [], "decoder": []}
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        objective.backward(
            objective.log_weights(model, x, g),
            model.encoder_parameters(),
            model.decoder_parameters(),
        )
        grads["encoder"].append(torch.cat([p.grad.reshape(-1) for p in model.encoder_parameters()]))
        grads["decoder"].append(torch.cat([p.grad.reshape(-1) for p in model.decoder_parameters()]))
    for net, gs in grads.items():
        gs = torch.stack(gs)
        varies = (
            gs.std(0) > 0
        )  # the encoder weights of pixels that are 0 in all of x get no gradient
        assert 0 < varies.sum() < gs.shape[1] or net == "decoder"
        assert got[net] == pytest.approx(
            (gs.mean(0).abs() / gs.std(0))[varies].mean().item(), rel=1e-9
        )


def test_snr_trends_on_a_tiny_model():
    """Rainforth et al.: with reparam the encoder SNR falls with K and the decoder's rises;
    DReG's encoder SNR does not fall. These are large-K trends: they need light-tailed
    weights, so q is made wider than the prior here (with a q narrower than p(h|x) the
    effective sample size grows far slower than K and the trends only set in much later)."""
    torch.manual_seed(0)
    model, x = VAE(ModelConfig(x_dim=6, latent=(2,), hidden=((8,),))).double(), tiny_data(n=3)
    with torch.no_grad():
        model.encoder[0].scale.weight.mul_(0.1)
        model.encoder[0].scale.bias.fill_(0.3)
    ks = [1, 10, 100]
    reparam = gradient_snr_curve(model, x, ks, "reparam", reps=100)
    dreg = gradient_snr_curve(model, x, ks, "dreg", reps=100)
    assert reparam["encoder_slope"] < -0.25, reparam
    assert dreg["encoder_slope"] > 0.0, dreg
    assert reparam["decoder_slope"] > 0.3 and dreg["decoder"] == reparam["decoder"]
    assert loglog_slope([1, 10], [1.0, 10.0]) == pytest.approx(1.0)
    assert loglog_slope([5], [1.0]) is None


# -- the command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--k", "0"],
        ["--k", "1,a"],
        ["--k", "5,5"],
        ["--estimator", "reinforce"],
        ["--reps", "1"],
        ["--preset", "burda3"],
        [],  # neither RUN_DIR nor --preset
    ],
)
def test_bad_snr_arguments_exit_2_and_write_nothing(argv, tmp_path, capsys):
    out = tmp_path / "snr"
    preset = [] if argv in ([], ["--preset", "burda3"]) else ["--preset", "burda1"]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(
            main(["snr", *preset, *argv, "--data-dir", str(tmp_path / "nodata"), "--out", str(out)])
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iwae") and "error" in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "nodata").exists()


def test_snr_command_on_a_run_directory(shared_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    small = ModelConfig(latent=(2,), hidden=((4,),))
    config = TrainConfig(data_dir=str(shared_data_dir), model=small.to_dict())
    write_json(run / "config.json", config.to_dict())
    save_weights(VAE(small), run / "model.safetensors")
    out = tmp_path / "snr"
    assert (
        main(
            [
                "snr",
                str(run),
                "--k",
                "1,3",
                "--estimator",
                "reparam,dreg",
                "--reps",
                "3",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads((out / "snr.json").read_text())
    assert [r["estimator"] for r in result] == ["reparam", "dreg"]
    for r in result:
        assert r["k"] == [1, 3] and len(r["encoder"]) == len(r["decoder"]) == 2 and r["reps"] == 3
        assert (
            all(v > 0 for v in r["encoder"] + r["decoder"])
            and "encoder_slope" in r
            and "decoder_slope" in r
        )
    assert (out / "snr.png").stat().st_size > 1000
    assert "slope" in capsys.readouterr().out

    assert (
        main(
            [
                "snr",
                "--preset",
                "burda2",
                "--k",
                "2",
                "--reps",
                "2",
                "--batch-size",
                "4",
                "--data-dir",
                str(shared_data_dir),
                "--out",
                str(out),
                "--quiet",
                "--overwrite",
            ]
        )
        == 0
    )
    single = json.loads((out / "snr.json").read_text())
    assert (
        single["estimator"] == "reparam" and single["k"] == [2] and single["encoder_slope"] is None
    )


def test_estimator_on_the_command_line(tmp_path, capsys):

    assert (
        build_parser().parse_args(["train", "--estimator", "dreg", "--out", "x"]).estimator
        == "dreg"
    )
    with pytest.raises(SystemExit) as e:
        main(["train", "--estimator", "reinforce", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    r = subprocess.run(
        [sys.executable, "-m", "iwae.cli", "snr", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "usage: iwae snr" in r.stdout and "--estimator" in r.stdout
