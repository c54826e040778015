"""The command line: bad arguments fail cleanly; an end-to-end run on real MNIST learns."""

import json
import math
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

from iwae.cli import main
from iwae.data import binarize_fixed, load_dataset, test_subset_indices
from iwae.train import read_evaluation_images


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "-k", "0"],
        ["train", "-m", "0", "--objective", "miwae"],
        ["train", "--beta", "1.5", "--objective", "ciwae"],
        ["train", "--beta", "nan", "--objective", "ciwae"],
        ["train", "--dataset", "cifar"],
        ["train", "--objective", "elbo"],
        ["train", "--layers", "3"],
        ["train", "--stages", "9"],
        ["train", "--stages", "2", "--epochs", "3"],
        ["train", "--objective", "iwae", "-m", "4", "-k", "16"],
    ],
)
def test_bad_train_arguments_exit_2_and_write_nothing(argv, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        code = main([*argv, "--out", str(out), "--data-dir", str(tmp_path / "nodata")])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iwae") and "error" in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "nodata").exists()


@pytest.mark.parametrize("command", [["evaluate"], ["sample", "--out", "x.png"]])
def test_missing_run_directory(command, tmp_path, capsys):
    argv = [command[0], str(tmp_path / "missing"), *command[1:]]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["evaluate", "--chains", "3"], ["--chains", "--method ais"]),
        (
            ["evaluate", "--ais-steps", "10", "--hmc-leapfrog", "2"],
            ["--ais-steps", "--hmc-leapfrog"],
        ),
        (["evaluate", "--method", "ais", "--ais-steps", "0"], ["--ais-steps"]),
        (["evaluate", "--method", "mcmc"], ["--method"]),
        (["bdmc", "--ais-steps", "10,0"], ["--ais-steps"]),
        (["bdmc", "--n", "0"], ["--n"]),
        (["bdmc", "--ais-init", "uniform"], ["--ais-init"]),
    ],
)
def test_bad_ais_arguments_exit_2_and_write_nothing(argv, words, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main([argv[0], str(run), *argv[1:]]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not any(run.iterdir())


def test_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("iwae.data.mnist.MNIST_MIRRORS", [])  # offline
    code = main(
        [
            "train",
            "--epochs",
            "1",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "train-images-idx3-ubyte" in err and str(tmp_path) in err
    assert not (tmp_path / "run").exists()


def test_every_command_has_help():
    for command in ([], ["train"], ["evaluate"], ["sample"], ["bdmc"]):
        r = subprocess.run(
            [sys.executable, "-m", "iwae.cli", *command, "--help"], capture_output=True, text=True
        )
        assert r.returncode == 0 and "usage: iwae" in r.stdout and len(r.stdout) > 300


@pytest.mark.parametrize(
    "dataset, layers",
    [("mnist", "1"), pytest.param("omniglot", "2", marks=pytest.mark.slow)],
)
def test_end_to_end_on_a_subset(shared_data_dir, tmp_path, capsys, monkeypatch, dataset, layers):
    """Train a few hundred steps, evaluate, sample: the NLL beats the pixel-mean model."""

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads_before = torch.get_num_threads()
    run = tmp_path / "run"
    n_train, n_test = 4000, 300
    code = main(
        [
            "train",
            "--dataset",
            dataset,
            "--layers",
            layers,
            "--objective",
            "iwae",
            "-k",
            "5",
            "--epochs",
            "2",
            "--n-train",
            str(n_train),
            "--eval-every",
            "1",
            "--eval-n",
            "200",
            "--data-dir",
            str(shared_data_dir),
            "--out",
            str(run),
            "--quiet",
        ]
    )
    assert code == 0
    assert {p.name for p in run.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "metrics.jsonl",
        "summary.json",
    }
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["pass"] for m in metrics] == [1, 2] and all("test_iwae64" in m for m in metrics)
    assert metrics[1]["train_bound"] > metrics[0]["train_bound"]
    # --threads auto: batch 20 x 5 samples = 100 rows per step run on one thread;
    # torch restored after
    assert json.loads((run / "summary.json").read_text())["torch_threads"] == 1
    assert torch.get_num_threads() == threads_before

    capsys.readouterr()
    assert (
        main(["evaluate", str(run), "--k", "200", "--n-test", str(n_test), "--json", "--quiet"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((run / "evaluation.json").read_text())
    assert (
        result["n_test"] == n_test
        and result["k"] == 200
        and len(result["active_units"]) == int(layers)
    )

    data = load_dataset(dataset, shared_data_dir)
    subset = test_subset_indices(data.test.shape[0], n_test)
    assert result["test_subset_seed"] == 0 and result["test_set_size"] == data.test.shape[0]
    per_image = read_evaluation_images(
        run
    )  # the per-image values behind the means, on the subset's images
    assert np.array_equal(per_image["test_index"].numpy(), subset)
    assert math.isclose(-per_image["log_px"].double().mean().item(), result["nll"], rel_tol=1e-9)
    assert math.isclose(per_image["iwae64"].double().mean().item(), result["iwae64"], rel_tol=1e-9)
    p = np.clip(data.train[:n_train].mean(0), 0.001, 0.999)
    x = binarize_fixed(data.test, seed=0)[subset]
    baseline_nll = -(x * np.log(p) + (1 - x) * np.log1p(-p)).sum(1).mean()
    assert result["nll"] < baseline_nll - {"mnist": 40, "omniglot": 15}[dataset], (
        result["nll"],
        baseline_nll,
    )
    assert result["elbo"] < result["iwae64"] <= result["log_px"] + 1.0
    assert math.isclose(result["neg_kl_q_p"], result["iwae64"] - result["log_px"], rel_tol=1e-9)

    # AIS on 50 of those images (the 50-image subset lies inside the 300-image one, so L_200
    # is read from evaluation.safetensors, not computed again), into --out; evaluation.json
    # untouched
    ais_dir = tmp_path / "ais"
    assert (
        main(
            [
                "evaluate",
                str(run),
                "--method",
                "ais",
                "--ais-steps",
                "20",
                "--chains",
                "2",
                "--hmc-leapfrog",
                "2",
                "--n-test",
                "50",
                "--json",
                "--quiet",
                "--out",
                str(ais_dir),
            ]
        )
        == 0
    )
    ais = json.loads(capsys.readouterr().out)
    assert ais == json.loads((ais_dir / "ais.json").read_text())
    assert json.loads((run / "evaluation.json").read_text()) == result
    assert (
        ais["iwae_source"] == "evaluation.safetensors"
        and ais["iwae_k"] == 200
        and ais["n_test"] == 50
    )
    sub50 = test_subset_indices(data.test.shape[0], 50)
    l200 = per_image["log_px"].double()[np.searchsorted(subset, sub50)]
    assert math.isclose(ais["log_px_iwae"], l200.mean().item(), rel_tol=1e-6)
    assert math.isclose(
        ais["ais_gap"], ais["log_px_ais"] - ais["log_px_iwae"], rel_tol=1e-6, abs_tol=1e-6
    )
    assert 0.0 < ais["ais_acceptance"] <= 1.0 and (
        ais["ais_steps"],
        ais["chains"],
        ais["hmc_leapfrog"],
    ) == (20, 2, 2)
    assert abs(ais["ais_gap"]) < 20.0
    assert ais["cpu"] and ais["torch"] and ais["torch_threads"] >= 1  # where the time was measured

    assert (
        main(
            [
                "bdmc",
                str(run),
                "--n",
                "8",
                "--ais-steps",
                "2,20",
                "--chains",
                "2",
                "--hmc-leapfrog",
                "2",
                "--quiet",
                "--out",
                str(ais_dir),
            ]
        )
        == 0
    )
    bdmc = json.loads((ais_dir / "bdmc.json").read_text())
    assert bdmc["steps"] == [2, 20] and bdmc["n"] == 8
    assert all(lo < up for lo, up in zip(bdmc["lower"], bdmc["upper"]))
    assert matplotlib_image_shape(ais_dir / "bdmc.png")[2] in (3, 4)
    # existing results are replaced only with --overwrite (refused before any work, nothing touched)
    before = {f: (ais_dir / f).read_bytes() for f in ("ais.json", "bdmc.json")}
    for argv in (
        ["evaluate", str(run), "--method", "ais", "--ais-steps", "2", "--n-test", "5"],
        ["bdmc", str(run), "--n", "2"],
    ):
        capsys.readouterr()
        assert main([*argv, "--quiet", "--out", str(ais_dir)]) == 2
        assert "--overwrite" in capsys.readouterr().err
    assert before == {f: (ais_dir / f).read_bytes() for f in before}
    assert (
        main(
            [
                "bdmc",
                str(run),
                "--n",
                "2",
                "--ais-steps",
                "2",
                "--chains",
                "2",
                "--hmc-leapfrog",
                "2",
                "--quiet",
                "--out",
                str(ais_dir),
                "--overwrite",
            ]
        )
        == 0
    )
    assert json.loads((ais_dir / "bdmc.json").read_text())["n"] == 2
    assert (
        main(["evaluate", str(run), "--method", "ais", "--per-example", str(tmp_path / "p.csv")])
        == 2
    )
    assert "--per-example is for --method iwae" in capsys.readouterr().err

    grid = tmp_path / "grid.png"
    assert main(["sample", str(run), "--out", str(grid), "--n", "16"]) == 0

    image = matplotlib.image.imread(grid)
    assert image.shape[:2] == (4 * 29 + 1, 4 * 29 + 1)


def matplotlib_image_shape(path):
    return matplotlib.image.imread(path).shape
