"""Models with every likelihood and the convolutional architecture: L_k reaches log p(x)
by quadrature; the configuration, the data, the CLI and iwae.fit carry them through
training, a time-limit stop and --resume (bit for bit), evaluation (L_k, bits per
dimension, AIS), BDMC and sampling."""

import json
import math

import numpy as np
import pytest
import safetensors.torch
import torch
from test_time_limit import _limit_after
from tiny import exact_log_px, fit_encoder

import iwae
from iwae.bounds import elbo
from iwae.bounds import iwae as iwae_bound
from iwae.cli import main
from iwae.config import TrainConfig
from iwae.conv import ConvConfig, ConvVAE
from iwae.data import DataError, binarized_test, from_arrays, load_files, test_images
from iwae.errors import IwaeError, TimeLimitReached
from iwae.likelihoods import (
    ContinuousBernoulli,
    Gaussian,
    Logistic256,
    get_likelihood,
    make_likelihood,
)
from iwae.lockstep import stackable, train_lockstep
from iwae.model import VAE, ModelConfig

#: (likelihood, gaussian_scale) of every model tested
KINDS = [
    ("bernoulli", "decoder"),
    ("continuous-bernoulli", "decoder"),
    ("gaussian", "decoder"),
    ("gaussian", "learned"),
    ("logistic-256", "decoder"),
]
IDS = ["bernoulli", "cb", "gaussian", "gaussian-learned", "logistic-256"]


def data_for(likelihood: str, shape, n: int, seed: int = 1) -> torch.Tensor:
    """n examples of ``shape`` in the likelihood's support (float64, flat)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, math.prod(shape)), dtype=torch.float64, generator=g)
    if likelihood == "bernoulli":
        return torch.bernoulli(x, generator=g)
    if likelihood == "logistic-256":
        return torch.round(x * 255) / 255
    return x


def mlp_model(likelihood, gaussian_scale, x_dim=6, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(x_dim, (2,), ((8,),), likelihood=likelihood, gaussian_scale=gaussian_scale)
    return VAE(config).double()


def conv_model(likelihood, gaussian_scale, shape=(4, 5), seed=0):
    torch.manual_seed(seed)
    config = ConvConfig(shape, (3,), (2,), likelihood=likelihood, gaussian_scale=gaussian_scale)
    return ConvVAE(config).double()


# -- L_k against quadrature -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood, gaussian_scale", KINDS, ids=IDS)
def test_l_k_reaches_log_px_by_quadrature(likelihood, gaussian_scale, arch):
    """With a 2-D latent and the encoder fitted a little, the ELBO lies below log p(x) by
    quadrature (tiny.exact_log_px) and L_20000 within 0.02 nats of it."""
    if arch == "mlp":
        model, shape = mlp_model(likelihood, gaussian_scale), (6,)
    else:
        model, shape = conv_model(likelihood, gaussian_scale), (4, 5)
    x = data_for(likelihood, shape, 3)
    fit_encoder(model, x, steps=300)
    exact = exact_log_px(model, x, step=0.04)
    with torch.no_grad():
        log_w = model.log_weights(x, 20000, torch.Generator().manual_seed(3))
    assert bool((elbo(log_w) < exact).all())
    assert torch.allclose(iwae_bound(log_w), exact, atol=0.02), (iwae_bound(log_w), exact)


# -- the models -------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood, gaussian_scale", KINDS, ids=IDS)
def test_output_layer_and_initial_bias(likelihood, gaussian_scale):
    """The MLP's and the conv model's decoders give params_per_dim * D outputs, starting from
    parameters whose mean is the pixel mean (clipped as the likelihood's initial_bias says)."""
    mean = torch.linspace(0.05, 0.95, 20)
    mlp = VAE(ModelConfig(20, (3,), ((5,),), likelihood=likelihood, gaussian_scale=gaussian_scale))
    mlp.reset_parameters(mean)
    conv_config = ConvConfig(
        (4, 5), (2,), (3,), likelihood=likelihood, gaussian_scale=gaussian_scale
    )
    conv = ConvVAE(conv_config, pixel_mean=mean)
    two = likelihood == "logistic-256" or (likelihood, gaussian_scale) == ("gaussian", "decoder")
    per_dim = 2 if two else 1
    for model in (mlp, conv):
        assert model.likelihood.name == likelihood
        assert model.likelihood.params_per_dim == per_dim
        h = torch.zeros(1, 3)
        params = model.likelihood_params(h)
        assert params.shape == (1, per_dim * 20)
        bias = model.likelihood.initial_bias(mean)
        assert torch.allclose(model.likelihood.mean(bias), mean, atol=1e-4)
    assert torch.equal(mlp.output_layer.bias, mlp.likelihood.initial_bias(mean))
    learned = [p for p in mlp.likelihood.parameters()]
    assert len(learned) == (gaussian_scale == "learned" and likelihood == "gaussian")
    if learned:  # the learned scale trains with the decoder and is saved
        assert any(p is learned[0] for p in mlp.decoder_parameters())
        assert "likelihood.raw_log_scale" in mlp.state_dict()


def test_bernoulli_mlp_is_as_before():
    """A Bernoulli MLP has no likelihood submodule, D outputs, the logit of the clipped pixel
    mean as output bias, and its fast log-likelihood; its table is the one of old runs."""
    mean = torch.rand(784)
    model = VAE(ModelConfig(), pixel_mean=mean)
    assert "likelihood" not in model._modules and model.output_layer.out_features == 784
    assert torch.equal(model.output_layer.bias, torch.logit(mean.clamp(0.001, 0.999)))
    assert ModelConfig().to_dict() == {
        "x_dim": 784,
        "latent": [50],
        "hidden": [[200, 200]],
        "scale": "exp",
    }
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()


def test_non_bernoulli_mlp_log_likelihood_is_the_likelihoods():
    model = mlp_model("gaussian", "decoder")
    x, h = data_for("gaussian", (6,), 4), torch.randn(12, 4, 2, dtype=torch.float64)
    expected = model.likelihood.log_prob(model.likelihood_net(h), x)
    assert torch.equal(model.log_likelihood(x, h), expected)


@pytest.mark.parametrize("shape", [(28, 28), (13, 17), (12, 12), (8, 9)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "logistic-256"])
def test_conv_model_on_images_of_any_size(shape, likelihood):
    """Odd sides come back exactly (output_padding): the decoder gives P*H*W parameters for
    samples of any leading shape, and samples are images of H*W pixels."""
    model = ConvVAE(ConvConfig(shape, (4, 8), (3,), likelihood=likelihood))
    x = data_for(likelihood, shape, 5).float()
    assert model.log_weights(x, 7).shape == (7, 5)
    per_dim = model.likelihood.params_per_dim
    assert model.likelihood_params(torch.zeros(2, 5, 3)).shape == (2, 5, per_dim * x.shape[1])
    assert model.sample_images(3).shape == (3, x.shape[1])
    assert model.sample_x(torch.zeros(3, 3)).shape == (3, x.shape[1])


def test_conv_configuration_is_checked():
    with pytest.raises(IwaeError, match="one stochastic layer"):
        TrainConfig(arch="conv", latent="4,2", stages=1)
    with pytest.raises(IwaeError, match="one stochastic layer"):
        TrainConfig(arch="conv", layers=2, stages=1)
    with pytest.raises(IwaeError, match="--hidden is for --arch mlp"):
        TrainConfig(arch="conv", latent="4", hidden="8", stages=1)
    with pytest.raises(IwaeError, match="--scale is for --arch mlp"):
        TrainConfig(arch="conv", scale="softplus", stages=1)
    with pytest.raises(IwaeError, match="--channels is for --arch conv"):
        TrainConfig(channels="8", stages=1)
    with pytest.raises(IwaeError, match="at most 2 entries"):
        TrainConfig(arch="conv", channels="4,4,4", image_shape=[5, 7], stages=1)
    with pytest.raises(IwaeError, match=r"needs images of shape \[H, W\]"):
        TrainConfig(arch="conv", image_shape=[30], stages=1)
    with pytest.raises(IwaeError, match="unknown arch"):
        TrainConfig(arch="resnet", stages=1)
    config = TrainConfig(arch="conv", channels="8,16", latent="6", stages=1)  # MNIST 28x28
    assert config.model == {
        "arch": "conv",
        "image_shape": [28, 28],
        "channels": [8, 16],
        "latent": [6],
        "likelihood": "bernoulli",
        "gaussian_scale": "decoder",
    }
    assert config.channels == [8, 16] and config.latent == [6] and config.layers == 1
    assert TrainConfig(arch="conv", stages=1).model_config == ConvConfig()  # 32,64 and 50


def test_likelihood_configuration():
    """Runs without the keys are Bernoulli MLPs; the likelihood is recorded in the model
    table, which must agree with it; dynamic binarization is Bernoulli's only."""
    old = TrainConfig.from_dict({"dataset": "mnist", "stages": 1, "model": ModelConfig().to_dict()})
    assert old.likelihood == "bernoulli" and old.arch == "mlp" and old.binarizes
    config = TrainConfig(likelihood="gaussian", gaussian_scale="learned", stages=1)
    assert config.model["likelihood"] == "gaussian" and config.model["gaussian_scale"] == "learned"
    assert not config.binarizes and not config.eight_bit
    assert TrainConfig(likelihood="logistic-256", stages=1).eight_bit
    with pytest.raises(IwaeError, match="drop the model table"):
        TrainConfig(likelihood="gaussian", model=ModelConfig().to_dict(), stages=1)
    with pytest.raises(IwaeError, match="--binarize dynamic draws binary images"):
        TrainConfig(likelihood="continuous-bernoulli", binarize="dynamic", stages=1)
    grey = from_arrays(np.full((4, 2, 2), 0.3), np.full((2, 2, 2), 0.6))
    for likelihood in ("continuous-bernoulli", "gaussian"):  # grey images, as they are
        TrainConfig(dataset="arrays", likelihood=likelihood, binarize="none", stages=1).for_data(
            grey
        )
    with pytest.raises(IwaeError, match="the Bernoulli decoder needs binary images"):
        TrainConfig(dataset="arrays", binarize="none", stages=1).for_data(grey)
    with pytest.raises(IwaeError, match="unknown likelihood"):
        TrainConfig(likelihood="poisson", stages=1)
    with pytest.raises(IwaeError, match="unknown gaussian_scale"):
        TrainConfig(likelihood="gaussian", gaussian_scale="fixed", stages=1)
    # a new likelihood on the command line replaces a --config file's model table
    file_keys = TrainConfig(stages=1).to_dict()
    config, _ = TrainConfig.from_sources(file_keys, {"likelihood": "gaussian"}, "out")
    assert config.model_config.likelihood == "gaussian"


def test_lockstep_keeps_conv_and_learned_scales_apart(tmp_path):
    assert stackable(TrainConfig(likelihood="logistic-256", stages=1))
    assert not stackable(TrainConfig(arch="conv", stages=1))
    assert not stackable(TrainConfig(likelihood="gaussian", gaussian_scale="learned", stages=1))
    configs = [TrainConfig(arch="conv", channels="2", latent="2", stages=1, seed=s) for s in (0, 1)]
    with pytest.raises(IwaeError, match="train conv models"):
        train_lockstep(configs, [tmp_path / "a", tmp_path / "b"], progress=False)


def test_make_likelihood():
    assert make_likelihood("gaussian", "learned", 5).raw_log_scale.shape == (5,)
    assert isinstance(make_likelihood("logistic-256", "learned", 5), Logistic256)
    assert isinstance(get_likelihood("continuous-bernoulli"), ContinuousBernoulli)
    assert isinstance(make_likelihood("gaussian"), Gaussian)


# -- data -------------------------------------------------------------------------------------


def test_eight_bit_files_are_read_as_levels(tmp_path):
    """With eight_bit a uint8 .npz holds the levels 0..255, read as v / 255 (the values and
    hash of the same images as floats); without it, values above 1 are refused as before."""
    rng = np.random.default_rng(0)
    levels = {
        s: rng.integers(0, 256, (n, 3, 4), dtype=np.uint8) for s, n in (("train", 6), ("test", 2))
    }
    np.savez(tmp_path / "u8.npz", **levels)
    with pytest.raises(DataError, match="divide by 255"):
        load_files(tmp_path / "u8.npz")
    data = load_files(tmp_path / "u8.npz", eight_bit=True)
    floats = {s: a.astype(np.float32) / np.float32(255) for s, a in levels.items()}
    np.savez(tmp_path / "f.npz", **floats)
    assert data.sha256 == load_files(tmp_path / "f.npz").sha256
    assert np.array_equal(data.train, floats["train"].reshape(6, 12))
    Logistic256().check_data(torch.tensor(data.train), "train")
    assert from_arrays(levels["train"], levels["test"], eight_bit=True).sha256 == data.sha256
    mnist_grid = np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    Logistic256().check_data(torch.from_numpy(mnist_grid), "load_mnist's values")
    np.savez(tmp_path / "bad.npz", train=np.full((2, 3), 300), test=np.zeros((1, 3), np.int64))
    with pytest.raises(DataError, match="levels 0 to 255"):
        load_files(tmp_path / "bad.npz", eight_bit=True)


def test_test_images_are_binarized_for_bernoulli_only(tmp_path):
    rng = np.random.default_rng(0)
    data = from_arrays(rng.random((5, 6)), rng.random((9, 6)))
    grey = test_images(data, 4, binarize=False)
    assert grey.shape == (4, 6) and not np.isin(grey, (0, 1)).all()
    assert np.array_equal(test_images(data, 4), binarized_test(data, 4))


# -- through the CLI and iwae.fit -------------------------------------------------------------

SHAPE = (12, 12)


def _data_file(tmp_path, likelihood: str) -> str:
    """40 training and 10 test images of 12x12: uint8 levels for logistic-256, else grey
    values (binarized afresh in training for Bernoulli)."""
    rng = np.random.default_rng(0)
    base = rng.random((1, *SHAPE))
    images = np.clip(base + 0.2 * rng.standard_normal((50, *SHAPE)), 0, 1)
    if likelihood == "logistic-256":
        images = np.round(images * 255).astype(np.uint8)
    else:
        images = images.astype(np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, train=images[:40], test=images[40:])
    return str(path)


def _weights(run) -> dict:
    return safetensors.torch.load_file(run / "model.safetensors")


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [
        k for k in wa if not torch.equal(wa[k], wb[k])
    ]


ARCH_KEYS = {"mlp": {"latent": "2", "hidden": "16"}, "conv": {"channels": "4,8", "latent": "2"}}


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood, gaussian_scale", KINDS, ids=IDS)
def test_every_likelihood_and_architecture_end_to_end(
    tmp_path, monkeypatch, capsys, likelihood, gaussian_scale, arch
):
    """Train from the CLI; stopped at a time limit mid-pass and resumed it ends with the same
    weights, bit for bit, as a run never stopped, and so does iwae.fit; evaluate (L_k, bits
    per dimension for 8-bit data, AIS), bdmc and sample run on it."""
    data = _data_file(tmp_path, likelihood)
    keys = {"likelihood": likelihood, "arch": arch, **ARCH_KEYS[arch]}
    if likelihood == "gaussian":
        keys["gaussian_scale"] = gaussian_scale
    flags = [f for key, value in keys.items() for f in (f"--{key.replace('_', '-')}", value)]
    base = ["train", "--dataset", data, *flags, "-k", "3", "--epochs", "2", "--eval-n", "10"]
    base += ["--stage-nll-k", "20", "--precision", "fp32", "--quiet"]  # compared bit for bit
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*base, "--out", str(whole)]) == 0
    config = json.loads((whole / "config.json").read_text())
    assert config["likelihood"] == likelihood and config["arch"] == arch
    assert config["model"].get("likelihood", "bernoulli") == likelihood
    with monkeypatch.context() as m:
        _limit_after(m, 1)  # after the first of the 2 steps of pass 1
        assert main([*base, "--out", str(cut), "--time-limit", "60"]) == 3
    assert "time limit reached" in capsys.readouterr().err
    assert main(["train", "--resume", str(cut), "--quiet"]) == 0
    _assert_same_weights(whole, cut)

    fit_keys = {**keys, "eval_n": 10, "stage_nll_k": 20, "precision": "fp32"}
    fitted = tmp_path / "fit"
    with monkeypatch.context() as m:
        _limit_after(m, 2)
        with pytest.raises(TimeLimitReached):
            iwae.fit(
                None,
                "iwae",
                data,
                out=fitted,
                k=3,
                epochs=2,
                progress=False,
                time_limit=60,
                **fit_keys,
            )
    iwae.fit(None, "iwae", data, out=fitted, k=3, epochs=2, progress=False, **fit_keys)
    _assert_same_weights(whole, fitted)

    capsys.readouterr()
    assert main(["evaluate", str(whole), "-k", "20", "--n-test", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert math.isfinite(result["nll"]) and result["n_test"] == 5
    assert ("bits_per_dim" in result) == (likelihood == "logistic-256")
    if likelihood == "logistic-256":  # nats / (D ln 2), of the 8-bit data
        assert result["bits_per_dim"] == pytest.approx(
            result["nll"] / (144 * math.log(2)), rel=1e-12
        )
        assert main(["evaluate", str(whole), "-k", "20", "--n-test", "5"]) == 0
        assert "bits per dimension of the 8-bit data" in capsys.readouterr().out
    assert iwae.evaluate_model(str(whole), k=20, n_test=5)["nll"] == pytest.approx(
        result["nll"], abs=1e-5
    )
    ais = ["evaluate", str(whole), "--method", "ais", "--ais-steps", "5", "--chains", "2"]
    assert main([*ais, "--n-test", "3", "--json", "--quiet"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["log_px_ais"])
    bdmc = ["bdmc", str(whole), "--n", "2", "--ais-steps", "3", "--chains", "2", "--json"]
    assert main(bdmc) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["lower"][0])
    assert main(["sample", str(whole), "--out", str(tmp_path / "s.png"), "--n", "4"]) == 0
    assert (tmp_path / "s.png").exists()
    if likelihood != "bernoulli":
        assert main(["sample", str(whole), "--out", str(tmp_path / "b.png"), "--binary"]) == 2
        assert "--binary draws Bernoulli pixels" in capsys.readouterr().err


def test_logistic_256_on_grey_data_is_refused(tmp_path, capsys):
    data = _data_file(tmp_path, "gaussian")  # grey values off the 8-bit grid
    train = ["train", "--dataset", data, "--likelihood", "logistic-256", "--epochs", "1"]
    assert main([*train, "--quiet", "--out", str(tmp_path / "r")]) == 2
    assert "logistic-256 needs the 256 levels" in capsys.readouterr().err
