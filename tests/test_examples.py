"""The examples in examples/, each run on a small budget."""

import sys
from pathlib import Path

import numpy as np

from iwae.cli import main
from iwae.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import conv_mnist  # noqa: E402 (examples/ is not a package)


def test_conv_mnist_example(shared_data_dir, tmp_path, capsys):
    argv = [
        "--data-dir",
        str(shared_data_dir),
        "--out",
        str(tmp_path / "run"),
        "--stages",
        "1",
        "--n-train",
        "200",
        "--n-test",
        "20",
        "--eval-k",
        "100",
        "--ais-steps",
        "10",
        "--ais-n",
        "5",
        "--stage-nll-k",
        "0",
    ]
    conv_mnist.main(argv)
    out = capsys.readouterr().out
    assert "trained 1 passes" in out and "test NLL (L_100, 20 images)" in out
    assert "log p(x) by AIS (10 steps, 5 images)" in out
    conv_mnist.main(argv)  # again: finished, so only evaluated
    assert len(read_metrics(tmp_path / "run")) == 1


def test_renyi_example_from_the_command_line(tmp_path, monkeypatch):
    """``iwae train --objective examples/renyi.py:bound`` as the README writes it."""
    monkeypatch.chdir(ROOT)
    g = np.random.default_rng(0)
    x = (g.random((120, 6, 6)) < 0.4).astype(np.float32)
    np.savez(tmp_path / "d.npz", train=x[:100], test=x[100:])
    run = tmp_path / "renyi"
    args = [
        "train",
        "--dataset",
        str(tmp_path / "d.npz"),
        "--objective",
        "examples/renyi.py:bound",
        "--objective-param",
        "alpha=0.5",
        "-k",
        "5",
        "--latent",
        "2",
        "--hidden",
        "8",
        "--stages",
        "2",
        "--stage-nll-k",
        "50",
        "--eval-n",
        "10",
        "--quiet",
        "--out",
        str(run),
    ]
    assert main(args) == 0
    assert main(["evaluate", str(run), "-k", "50", "--quiet"]) == 0
    assert [m["pass"] for m in read_metrics(run)] == [1, 2, 3, 4]
