"""Evaluating a run whose training has not finished (a full schedule still training): `iwae
evaluate` scores the weights of its latest stage end into ``stages/P/``, never into the run's
own ``evaluation.json``, which marks a finished and evaluated run; the run then continues
as if it had never been evaluated."""

import json
import sys
from pathlib import Path

import pytest

from iwae.cli import main
from iwae.errors import RunDirError
from iwae.experiments import Run
from iwae.rundir import save_weights, weights_passes
from iwae.train import evaluation_dir
from iwae.worker import Work, _evaluated

sys.path.insert(0, str(Path(__file__).parent))
from test_own_data import grey_npz  # noqa: E402
from test_time_limit import _limit_after  # noqa: E402
from test_train import SMALL_MODEL, assert_bitwise_equal, weights  # noqa: E402


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _train(capsys, npz, out, stages, *extra) -> int:
    # 60 training images at batch 20: 3 steps a pass; --stages 2 is 1 + 3 passes
    argv = ["train", "--dataset", npz, "--stages", stages, "-k", "2", "--latent", "4"]
    argv += ["--hidden", "16", "--eval-n", "10", "--stage-nll-k", "0", "--precision", "fp32"]
    return _cli(capsys, *argv, "--quiet", "--out", out, *extra)[0]


def test_an_unfinished_run_is_evaluated_at_its_stage_end_and_then_continues(
    tmp_path, monkeypatch, capsys
):
    npz = grey_npz(tmp_path / "data" / "d.npz")
    one_stage, run = tmp_path / "one-stage", tmp_path / "run"
    assert _train(capsys, npz, one_stage, 1) == 0
    assert weights_passes(one_stage / "model.safetensors") == 1
    with monkeypatch.context() as m:
        _limit_after(m, 8)  # the end of pass 2, in the second stage
        assert _train(capsys, npz, run, 2, "--time-limit", 60) == 3
    assert not (run / "summary.json").exists()
    assert weights_passes(run / "model.safetensors") == 1  # the first stage's end
    assert evaluation_dir(run) == (run / "stages" / "1", 1)

    code, out, err = _cli(capsys, "evaluate", run, "--k", "50", "--json", "--quiet")
    assert code == 0, err
    staged = json.loads(out)
    assert "has not finished" in err and "after 1 pass ->" in err and "stages/1" in err
    assert not (run / "evaluation.json").exists() and not (run / "evaluation.safetensors").exists()
    assert json.loads((run / "stages" / "1" / "evaluation.json").read_text()) == staged
    assert (run / "stages" / "1" / "evaluation.safetensors").exists()
    # the same numbers as the finished one-stage run, which trained the same first stage
    assert _cli(capsys, "evaluate", one_stage, "--k", "50", "--quiet")[0] == 0
    final = json.loads((one_stage / "evaluation.json").read_text())
    assert staged == {**final, "passes": 1}

    code, out, err = _cli(
        capsys, "evaluate", run, "--method", "ais", "--ais-steps", "2", "--chains", "2", "--json"
    )
    assert code == 0, err
    ais = json.loads((run / "stages" / "1" / "ais.json").read_text())
    assert ais["passes"] == 1 and ais["iwae_source"] == "evaluation.safetensors"
    assert ais["log_px_iwae"] == pytest.approx(staged["log_px"], abs=1e-4)
    assert not (run / "ais.json").exists()

    # the run continues to the weights of a run never stopped; then evaluated as finished
    whole = tmp_path / "whole"
    assert _train(capsys, npz, whole, 2) == 0
    assert _cli(capsys, "train", "--resume", run, "--quiet")[0] == 0
    assert_bitwise_equal(weights(run), weights(whole))
    assert weights_passes(run / "model.safetensors") == 4
    assert evaluation_dir(run) == (run, None)
    assert _cli(capsys, "evaluate", run, "--k", "50", "--quiet")[0] == 0
    assert "passes" not in json.loads((run / "evaluation.json").read_text())
    assert (run / "stages" / "1" / "evaluation.json").exists()  # kept beside the final one


def test_weights_saved_before_their_passes_were_recorded_are_dated_from_the_metrics(tmp_path):
    """Weights without the ``passes`` metadata: the latest stage end that metrics.jsonl has
    passed (stages of 1, 3 and 9 passes end at passes 1, 4 and 13)."""
    from iwae.model import VAE, ModelConfig

    run = tmp_path / "run"
    run.mkdir()
    config = {"stages": 3, "model": SMALL_MODEL, "dataset": "mnist"}
    (run / "config.json").write_text(json.dumps(config))
    save_weights(VAE(ModelConfig.from_dict(SMALL_MODEL)), run / "model.safetensors")
    assert weights_passes(run / "model.safetensors") is None
    with pytest.raises(RunDirError, match="no stage end"):
        evaluation_dir(run)
    lines = [{"pass": p, "train_bound": -100.0} for p in range(1, 7)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert evaluation_dir(run) == (run / "stages" / "4", 4)


def test_unreadable_or_missing_weights_of_an_unfinished_run_are_named(tmp_path):
    """A truncated weights file cannot be dated (a RunDirError naming it, as when loading
    it), and a run before its first stage end has none to evaluate."""
    from iwae.model import VAE, ModelConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"stages": 3, "model": SMALL_MODEL}))
    with pytest.raises(RunDirError, match="has not finished its first stage"):
        evaluation_dir(run)
    save_weights(VAE(ModelConfig.from_dict(SMALL_MODEL)), run / "model.safetensors", passes=4)
    assert evaluation_dir(run) == (run / "stages" / "4", 4)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match="model.safetensors is not a readable safetensors"):
        evaluation_dir(run)
    (run / "summary.json").write_text("{}")  # finished: its directory, whatever the weights
    assert evaluation_dir(run) == (run, None)


def test_the_runner_resumes_a_run_with_an_evaluation_json_but_no_summary(tmp_path):
    """An ``evaluation.json`` written into a run still training (by ``iwae evaluate`` of an
    older version) never makes ``iwae reproduce`` skip the run: it resumes it."""
    exp = tmp_path / "exp"
    out = exp / "runs" / "r"
    out.mkdir(parents=True)
    (out / "evaluation.json").write_text(json.dumps({"nll": 90.0, "k": 5000, "n_test": 10_000}))
    run, work = Run("r", {"dataset": "mnist"}), Work(str(exp), None, 1)
    assert not _evaluated(run, out, work)
    (out / "summary.json").write_text(json.dumps({"passes": 13}))
    assert _evaluated(run, out, work)
