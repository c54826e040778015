"""The public API: iwae.fit with models and bounds of your own, resumed after SIGKILL bit for
bit, evaluated and run through AIS; a bound from a file through the CLI."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import iwae
from iwae.bounds import ESTIMATORS, OBJECTIVES
from iwae.checkpoint import CHECKPOINT_FILE
from iwae.cli import main
from iwae.errors import IwaeError
from iwae.rundir import read_metrics, read_safetensors

ROOT = Path(__file__).resolve().parents[1]


class ConvEncoder(nn.Module):
    """8x8 images (flat [N, 64]) -> (mean, log sigma) of a 3-D latent."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.out = nn.Linear(4 * 4 * 4, 6)

    def forward(self, x):
        a = torch.tanh(self.conv(x.view(-1, 1, 8, 8))).flatten(1)
        return self.out(a).chunk(2, -1)


class ConvDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4 * 4 * 4)
        self.deconv = nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1)

    def forward(self, h):
        return self.deconv(torch.tanh(self.inp(h)).view(-1, 4, 4, 4)).flatten(1)


def conv_vae(seed: int = 0) -> iwae.ModuleVAE:
    torch.manual_seed(seed)
    return iwae.ModuleVAE(ConvEncoder(), ConvDecoder(), latent=3)


def images(n_train: int = 60, n_test: int = 20, seed: int = 0):
    g = np.random.default_rng(seed)
    x = (g.random((n_train + n_test, 8, 8)) < np.linspace(0.1, 0.8, 8)).astype(np.float32)
    return x[:n_train], x[n_train:]


FAST = dict(eval_n=10, stage_nll_k=50, eval_every=1)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_conv_model_trains_with_every_objective_and_estimator(tmp_path, objective):
    m = 2 if objective in ("miwae", "piwae") else 1
    for estimator in ESTIMATORS:
        model = conv_vae()
        before = [p.detach().clone() for p in model.parameters()]
        summary = iwae.fit(
            model,
            objective,
            images(),
            out=tmp_path / estimator,
            k=2,
            m=m,
            estimator=estimator,
            epochs=1,
            progress=False,
            **FAST,
        )
        assert summary["passes"] == 1 and np.isfinite(summary["final_train_bound"])
        assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        config = json.loads((tmp_path / estimator / "config.json").read_text())
        assert config["model_code"] == "python" and config["model"]["latent"] == [3]
        assert (config["objective"], config["estimator"], config["m"]) == (objective, estimator, m)


_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
import iwae
from test_api import conv_vae, images
torch.set_num_threads(1)
iwae.fit(conv_vae(), "iwae", images(2000, 20), out=sys.argv[1], k=3, schedule=3,
         checkpoint_minutes=0.002, eval_n=10, stage_nll_k=50, progress=False, precision="fp32")
"""


def _run_and_kill(run: Path, rng: random.Random) -> int:
    """Start the child; once it has written a checkpoint of its own, SIGKILL it after a
    pause drawn from ``rng``. Returns its exit status."""

    def checkpoint_id():
        try:
            stat = (run / CHECKPOINT_FILE).stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    before = checkpoint_id()
    code = _CHILD.format(tests=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)])
    deadline = time.monotonic() + 120
    while checkpoint_id() == before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def test_fit_of_a_conv_model_resumes_after_sigkill_bit_for_bit(tmp_path):
    """The same fit call, killed twice and called again, ends with the weights of a run
    never interrupted; then it evaluates and runs AIS."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = images(2000, 20)
        reference = conv_vae()
        iwae.fit(
            reference,
            "iwae",
            data,
            out=tmp_path / "reference",
            k=3,
            schedule=3,
            checkpoint_minutes=0.002,
            eval_n=10,
            stage_nll_k=50,
            progress=False,
            precision="fp32",  # compared bit for bit: no timing decides
        )
        run, rng = tmp_path / "killed", random.Random(7)
        for _ in range(2):
            assert _run_and_kill(run, rng) == -signal.SIGKILL
            assert not (run / "summary.json").exists() and len(read_metrics(run)) < 13
        model = conv_vae(seed=123)  # other initial weights: the checkpoint's replace them
        iwae.fit(
            model,
            "iwae",
            data,
            out=run,
            k=3,
            schedule=3,
            checkpoint_minutes=0.002,
            eval_n=10,
            stage_nll_k=50,
            progress=False,
            precision="fp32",  # compared bit for bit: no timing decides
        )
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(reference.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    saved = read_safetensors(run / "model.safetensors")[0]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert [m["train_bound"] for m in read_metrics(run)] == [
        m["train_bound"] for m in read_metrics(tmp_path / "reference")
    ]
    _, loaded = iwae.load(run, conv_vae(seed=5))
    result = iwae.evaluate_model(loaded, (data[0][:5], data[1]), k=500)
    assert result["n_test"] == 20 and 0 < result["nll"] < 64 * np.log(2)
    ais = iwae.run_ais(loaded, (data[0][:5], data[1]), steps=20, chains=4, n_test=10, k=500)
    assert ais["n_test"] == 10 and abs(ais["log_px_ais"] - ais["log_px_iwae"]) < 1.0


def test_fit_refuses_other_settings_on_an_existing_run(tmp_path):
    data = images()
    iwae.fit(conv_vae(), "iwae", data, out=tmp_path / "r", k=2, epochs=1, progress=False, **FAST)
    again = iwae.fit(
        conv_vae(), "iwae", data, out=tmp_path / "r", k=2, epochs=1, progress=False, **FAST
    )
    assert again["passes"] == 1  # finished: its summary
    with pytest.raises(IwaeError, match="other settings.*'k': 2 there, 3 now|k: 2 there, 3 now"):
        iwae.fit(
            conv_vae(), "iwae", data, out=tmp_path / "r", k=3, epochs=1, progress=False, **FAST
        )


def test_fit_takes_a_bound_object_and_the_builtin_model(tmp_path):
    """A plain function is a bound of your own; without a model, Burda's VAE is built."""

    def renyi_half(log_w):
        return 2.0 * iwae.iwae(0.5 * log_w)

    summary = iwae.fit(
        None,
        renyi_half,
        images(),
        out=tmp_path / "r",
        k=4,
        epochs=1,
        latent=[3],
        hidden=[[16]],
        progress=False,
        **FAST,
    )
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert summary["passes"] == 1 and config["objective"] == "renyi_half"
    assert config["objective_code"] == "python" and config["model"]["latent"] == [3]
    with pytest.raises(IwaeError, match="handed to iwae.fit as a Python object"):
        iwae.TrainConfig.from_dict(config).objective_spec


def test_a_bound_from_a_file_trains_resumes_and_evaluates_from_the_cli(tmp_path, capsys):
    bound = tmp_path / "renyi.py"
    shutil.copy(ROOT / "examples" / "renyi.py", bound)
    train_x, test_x = images(200, 40)
    np.savez(tmp_path / "data.npz", train=train_x, test=test_x)
    common = [
        "--dataset",
        str(tmp_path / "data.npz"),
        "-k",
        "4",
        "--latent",
        "3",
        "--hidden",
        "16",
        "--stage-nll-k",
        "50",
        "--eval-n",
        "20",
        "--quiet",
    ]
    spec = [f"--objective={bound}:bound", "--objective-param", "alpha=0.5"]
    assert main(["train", *spec, *common, "--stages", "3", "--out", str(tmp_path / "full")]) == 0
    # the same run stopped after its first stage, then continued with --resume
    first = ["train", *spec, *common, "--stages", "3", "--out", str(tmp_path / "cut")]
    assert main([*first, "--time-limit", "0.00001"]) == 3
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    a = read_safetensors(tmp_path / "full" / "model.safetensors")[0]
    b = read_safetensors(tmp_path / "cut" / "model.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["objective_params"] == {"alpha": 0.5}
    assert (
        config["objective_code"] == str(bound.resolve()) and len(config["objective_sha256"]) == 64
    )
    assert main(["evaluate", str(tmp_path / "full"), "-k", "100", "--quiet"]) == 0
    assert "test NLL" in capsys.readouterr().out
    bound.write_text(bound.read_text() + "\n# edited\n")
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 2
    assert main(["evaluate", str(tmp_path / "full"), "-k", "100", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{bound.resolve()} (--objective {bound}:bound) has changed" in err


def test_a_bound_name_that_is_neither_builtin_nor_code_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--objective", "iwea", "--out", "x"])
    assert "neither one of vae, iwae" in capsys.readouterr().err


def test_the_public_api_is_what_the_package_exports():
    for name in (
        "fit",
        "evaluate_model",
        "run_ais",
        "load",
        "ModuleVAE",
        "VAE",
        "Objective",
        "Bound",
        "LatentVariableModel",
        "Bernoulli",
        "from_arrays",
        "TrainConfig",
    ):
        assert name in iwae.__all__ and hasattr(iwae, name)
    assert isinstance(conv_vae(), iwae.LatentVariableModel)
