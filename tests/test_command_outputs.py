"""Output paths: every --out makes its missing parents and refuses to replace a result
without --overwrite; ``iwae evaluate --per-example FILE`` writes the per-image values."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from test_train import small_config, synthetic

from iwae.cli import build_parser, main
from iwae.data import binarize_fixed, test_subset_indices
from iwae.train import load_run, read_evaluation_images, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run on the synthetic set (100 test images)."""
    run = tmp_path_factory.mktemp("outputs") / "run"
    train(small_config(stages=1, stage_nll_k=0), run, dataset=synthetic(), progress=False)
    return run


@pytest.fixture
def synthetic_data(monkeypatch):
    """The commands' data: the synthetic set, whatever the data directory."""
    monkeypatch.setattr("iwae.data.load_dataset", lambda *args, **kwargs: synthetic())


def _fails(argv, capsys, *words) -> None:
    """``argv`` exits with code 2 and one line on stderr holding ``words``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_every_out_makes_its_parents_and_refuses_to_overwrite(
    trained, tmp_path, capsys, synthetic_data
):
    # iwae toy --out DIR
    toy = tmp_path / "a" / "b" / "toy"
    assert main(["toy", "--k-max", "5", "--out", str(toy)]) == 0
    before = (toy / "toy.json").read_bytes()
    _fails(["toy", "--k-max", "6", "--out", str(toy)], capsys, "toy.json", "--overwrite")
    assert (toy / "toy.json").read_bytes() == before
    assert main(["toy", "--k-max", "6", "--out", str(toy), "--overwrite"]) == 0
    assert len(json.loads((toy / "toy.json").read_text())["k"]) == 6

    # iwae sample RUN --out DIR/grid.png
    grid = tmp_path / "c" / "d" / "grid.png"
    assert main(["sample", str(trained), "--out", str(grid), "--n", "4"]) == 0
    before = grid.read_bytes()
    _fails(
        ["sample", str(trained), "--out", str(grid), "--n", "9"], capsys, str(grid), "--overwrite"
    )
    assert grid.read_bytes() == before
    assert main(["sample", str(trained), "--out", str(grid), "--n", "9", "--overwrite"]) == 0
    assert grid.read_bytes() != before
    _fails(["sample", str(trained), "--out", str(tmp_path / "e" / "grid.jpg")], capsys, ".png")
    (tmp_path / "file").write_text("")
    _fails(
        ["sample", str(trained), "--out", str(tmp_path / "file" / "grid.png")],
        capsys,
        "not a directory",
    )
    assert not (tmp_path / "e").exists()

    # iwae snr --out DIR: refused before any work when it already holds a result
    snr = tmp_path / "snr"
    snr.mkdir()
    (snr / "snr.png").write_bytes(b"old")
    _fails(
        ["snr", str(trained), "--k", "1", "--reps", "2", "--out", str(snr), "--quiet"],
        capsys,
        "snr.png",
    )
    assert sorted(p.name for p in snr.iterdir()) == ["snr.png"]
    snr = tmp_path / "f" / "snr"
    assert (
        main(["snr", str(trained), "--k", "1,2", "--reps", "2", "--out", str(snr), "--quiet"]) == 0
    )
    assert (snr / "snr.json").exists() and (snr / "snr.png").exists()

    # iwae train --out: its missing parents too
    run = tmp_path / "g" / "h" / "run"
    assert (
        main(["train", "--config", str(trained / "config.json"), "--out", str(run), "--quiet"]) == 0
    )
    assert (run / "summary.json").exists()
    _fails(
        ["train", "--config", str(trained / "config.json"), "--out", str(run), "--quiet"],
        capsys,
        "--overwrite",
    )


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=np.float64)


def test_per_example_values(trained, tmp_path, capsys, synthetic_data):
    """The per-image L_k, IWAE-64 and ELBO in test-set order: their means are evaluation.json's,
    and they are the values of an independent computation from the same draws."""
    k, n_test = (
        100,
        30,
    )  # 3,000 (image, sample) rows: one chunk, drawn as the direct computation below
    path = tmp_path / "new" / "per-example.csv"
    argv = ["evaluate", str(trained), "--k", str(k), "--n-test", str(n_test), "--quiet", "--json"]
    assert main([*argv, "--per-example", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    header, table = _read_csv(path)
    assert header == ["index", "log_px", "iwae64", "elbo"] and table.shape == (n_test, 4)
    index = test_subset_indices(100, n_test)
    assert np.array_equal(table[:, 0], index)
    # the means of evaluation.json (float32 values written exactly)
    assert -table[:, 1].mean() == pytest.approx(result["nll"], rel=1e-12)
    assert table[:, 2].mean() == pytest.approx(result["iwae64"], rel=1e-12)
    assert table[:, 3].mean() == pytest.approx(result["elbo"], rel=1e-12)
    stored = read_evaluation_images(trained)  # the same numbers as evaluation.safetensors
    assert np.array_equal(table[:, 1].astype(np.float32), stored["log_px"].numpy())
    # an independent computation: the same k draws of log-weights, reduced here
    _, model = load_run(trained)
    x = torch.from_numpy(binarize_fixed(synthetic().test, seed=0)[index])
    with torch.no_grad():
        log_w = model.eval().log_weights(x, k, generator=torch.Generator().manual_seed(0)).double()
    expected = np.stack(
        [
            (torch.logsumexp(log_w, 0) - math.log(k)).numpy(),
            (torch.logsumexp(log_w[:64], 0) - math.log(64)).numpy(),
            log_w.mean(0).numpy(),
        ],
        1,
    )
    np.testing.assert_allclose(table[:, 1:], expected, rtol=0, atol=1e-4)
    assert (table[:, 3] < table[:, 2]).all() and (table[:, 2] < table[:, 1] + 1.0).all()

    # .npy: a structured array with the same values
    npy = tmp_path / "per-example.npy"
    assert main([*argv, "--per-example", str(npy)]) == 0
    array = np.load(npy)
    assert (
        array.dtype.names == ("index", "log_px", "iwae64", "elbo")
        and array.dtype["index"] == np.int64
    )
    assert np.array_equal(array["index"], index)
    for column, name in enumerate(("log_px", "iwae64", "elbo"), start=1):
        assert np.array_equal(array[name], table[:, column].astype(np.float32)), name


def test_per_example_errors_come_before_any_work(trained, tmp_path, capsys, synthetic_data):
    evaluation = trained / "evaluation.json"
    evaluation.unlink(missing_ok=True)
    _fails(
        ["evaluate", str(trained), "--k", "2", "--per-example", str(tmp_path / "values.txt")],
        capsys,
        "--per-example",
        ".npy or .csv",
    )
    existing = tmp_path / "values.csv"
    existing.write_text("old\n")
    _fails(
        ["evaluate", str(trained), "--k", "2", "--per-example", str(existing)],
        capsys,
        str(existing),
        "--overwrite",
    )
    assert not evaluation.exists() and existing.read_text() == "old\n"
    assert (
        main(
            [
                "evaluate",
                str(trained),
                "--k",
                "2",
                "--n-test",
                "5",
                "--quiet",
                "--per-example",
                str(existing),
                "--overwrite",
            ]
        )
        == 0
    )
    assert (
        existing.read_text().splitlines()[0] == "index,log_px,iwae64,elbo"
        and len(existing.read_text().splitlines()) == 6
    )


def test_help_names_the_new_options():
    sub = build_parser()._subparsers._group_actions[0].choices
    for command, options in {
        "evaluate": ["--per-example", "--overwrite"],
        "sample": ["--overwrite"],
        "toy": ["--overwrite"],
        "snr": ["--overwrite"],
        "train": ["--resume"],
    }.items():
        text = sub[command].format_help()
        assert all(option in text for option in options), command
    text = {
        name: " ".join(sub[name].format_help().split()) for name in ("evaluate", "train")
    }  # unwrapped
    assert "index,log_px,iwae64,elbo" in text["evaluate"]
    assert (
        "one plain line every 30 s" in text["train"]
        and "starts again from its config.json" in text["train"]
    )
