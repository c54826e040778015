"""``--time-limit``: training stops at a wall-clock limit with every run checkpointed, and
continues from there as if it had never stopped (single runs, lockstep groups, the runner
and the CLI). Needed wherever a job has a wall-clock limit (a batch system's job, a machine
held for a limited time), where a command killed at its limit would lose every run's work
since its last checkpoint."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import iwae.engine
import iwae.evaluate
import iwae.worker as worker
from iwae.cli import main
from iwae.errors import TimeLimitReached
from iwae.experiments import Run, run_group, run_one
from iwae.train import read_metrics, resume, train, train_lockstep
from iwae.worker import _device_label

sys.path.insert(0, str(Path(__file__).parent))
from test_train import assert_bitwise_equal, small_config, synthetic, weights  # noqa: E402


def _limit_after(monkeypatch, calls: int) -> None:
    """The time limit is up from the ``calls``-th check on (one check per step, one per pass
    end)."""
    seen = []

    def time_up(run):
        seen.append(1)
        return run.stop_at is not None and len(seen) >= calls

    monkeypatch.setattr(iwae.engine, "_time_up", time_up)


def _without_seconds(run: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(run)]


def _train(configs, outs, data, lockstep, **kw):
    if lockstep:
        return train_lockstep(configs, outs, dataset=data, progress=False, **kw)
    return [train(c, o, dataset=data, progress=False, **kw) for c, o in zip(configs, outs)]


def _position(run: Path) -> tuple[int, int]:
    meta = json.loads(
        safetensors.safe_open(run / "checkpoint.safetensors", "pt").metadata()["state"]
    )
    return meta["progress"]["passes"], meta["progress"]["step"]


# 110 images at batch 20: 6 steps a pass, so 7 checks a pass; the 10th check is at pass 2,
# step 3, the 14th at the end of pass 2 (not a stage end: stages of 1 and 3 passes)
@pytest.mark.parametrize(
    "calls, where, position", [(10, "pass 2, step 3", (1, 3)), (14, "the end of pass 2", (2, 0))]
)
@pytest.mark.parametrize("lockstep", [False, True], ids=["single", "lockstep"])
def test_a_run_stopped_at_its_limit_continues_bit_for_bit(
    tmp_path, monkeypatch, lockstep, calls, where, position
):
    """Stopped mid-pass or at a pass end, every run is checkpointed right there, and continued
    it ends with the weights, metrics and generator state of a run never stopped."""
    data = synthetic(n=110)
    configs = [small_config(stages=2, k=4, seed=s) for s in (0, 1)][: 2 if lockstep else 1]
    whole = [tmp_path / f"whole{i}" for i in range(len(configs))]
    _train(configs, whole, data, lockstep)
    outs = [tmp_path / f"cut{i}" for i in range(len(configs))]
    with monkeypatch.context() as m:
        _limit_after(m, calls)
        with pytest.raises(TimeLimitReached, match=where) as stop:
            _train(configs, outs, data, lockstep, stop_at=time.time() + 3600)
    assert all(str(o) in str(stop.value) for o in outs)
    assert not any((o / "summary.json").exists() for o in outs)
    assert [_position(o) for o in outs] == [position] * len(outs)
    if lockstep:
        train_lockstep(configs, outs, dataset=data, progress=False, resume=True)
    else:
        resume(outs[0], dataset=data, progress=False)
    for cut, ref in zip(outs, whole):
        assert_bitwise_equal(weights(cut), weights(ref))
        assert _without_seconds(cut) == _without_seconds(ref)
        rng = [
            safetensors.torch.load_file(d / "checkpoint.safetensors")["rng.generator"]
            for d in (cut, ref)
        ]
        assert torch.equal(*rng)


def test_a_limit_already_past_stops_after_one_step(tmp_path):
    """With the real clock: a limit in the past stops at the first step's end, checkpointed."""
    out = tmp_path / "r"
    with pytest.raises(TimeLimitReached, match="pass 1, step 1 of 4"):
        train(
            small_config(stages=2, k=4),
            out,
            dataset=synthetic(n=110),
            progress=False,
            stop_at=time.time() - 1,
        )
    assert _position(out) == (0, 1)


def test_no_limit_never_stops(tmp_path, monkeypatch):
    """Without a limit the clock is never asked to stop a run (the check is for limits only)."""
    _limit_after(monkeypatch, 1)
    summary = train(
        small_config(stages=1, k=4), tmp_path / "r", dataset=synthetic(n=50), progress=False
    )
    assert summary["passes"] == 1


def test_the_runner_stops_and_continues_runs(shared_data_dir, tmp_path, monkeypatch):
    """run_one / run_group at the limit: status "stopped", the wall time so far in runner.json,
    nothing evaluated; again without a limit they finish with the weights of runs never
    stopped. Past the limit a run is not started at all."""
    tiny = dict(dataset="mnist", k=4, stages=2, n_train=110, eval_n=20, stage_nll_k=0)
    runs = [vars(Run(f"r{s}", dict(tiny, seed=s))) for s in (0, 1)]
    args = (str(shared_data_dir), 1)
    ref = tmp_path / "ref"
    run_group(runs, str(ref), *args, eval_k=8, n_test=10)
    run_one(runs[0], str(ref / "single"), *args, eval_k=8, n_test=10)
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        _limit_after(m, 10)
        assert [
            r["status"] for r in run_group(runs, str(cut), *args, 8, 10, stop_at=time.time() + 3600)
        ] == ["stopped"] * 2
        _limit_after(m, 10)
        assert (
            run_one(runs[0], str(cut / "single"), *args, 8, 10, stop_at=time.time() + 3600)[
                "status"
            ]
            == "stopped"
        )

    here = _device_label()
    for d, group in (
        (cut / "runs" / "r0", 2),
        (cut / "runs" / "r1", 2),
        (cut / "single" / "runs" / "r0", 1),
    ):
        timing = json.loads((d / "runner.json").read_text())
        assert timing["train_wall_s"] > 0 and timing["train_wall_s_by_device"] == {
            here: timing["train_wall_s"]
        }
        assert timing["train_share_s_by_device"] == {
            here: pytest.approx(timing["train_wall_s"] / group)
        }
        assert not (d / "evaluation.json").exists()
    assert (
        run_one(vars(Run("new", tiny)), str(cut), *args, 8, 10, stop_at=time.time() - 1)["status"]
        == "stopped"
    )
    assert not (cut / "runs" / "new").exists()
    assert {r["status"] for r in run_group(runs, str(cut), *args, eval_k=8, n_test=10)} == {"done"}
    assert run_one(runs[0], str(cut / "single"), *args, eval_k=8, n_test=10)["status"] == "done"
    for name, group in (("runs/r0", 2), ("runs/r1", 2), ("single/runs/r0", 1)):
        assert_bitwise_equal(weights(cut / name), weights(ref / name))
        timing = json.loads(
            (cut / name / "runner.json").read_text()
        )  # both parts of the training counted
        assert list(timing["train_wall_s_by_device"]) == [here]
        assert timing["train_wall_s_by_device"][here] == pytest.approx(timing["train_wall_s"])
        assert timing["train_share_s_by_device"][here] == pytest.approx(
            timing["train_wall_s"] / group
        )


def test_training_time_is_recorded_before_evaluation(shared_data_dir, tmp_path, monkeypatch):
    """A group whose evaluation is killed (its job's time ran out during it) keeps its
    training time in runner.json; evaluating it later adds no training time."""
    tiny = dict(dataset="mnist", k=4, stages=1, n_train=110, eval_n=20, stage_nll_k=0)
    runs = [vars(Run(f"r{s}", dict(tiny, seed=s))) for s in (0, 1)]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("the call's time is up")

    with monkeypatch.context() as m:
        m.setattr(iwae.evaluate, "evaluate_images", killed)
        with pytest.raises(KeyboardInterrupt):
            run_group(runs, str(tmp_path), str(shared_data_dir), 1, eval_k=8, n_test=10)
    here = _device_label()
    before = [json.loads((tmp_path / "runs" / r / "runner.json").read_text()) for r in ("r0", "r1")]
    for timing in before:
        assert timing["train_wall_s"] > 0 and timing["lockstep"] == ["r0", "r1"]
        assert timing["train_share_s_by_device"] == {
            here: pytest.approx(timing["train_wall_s"] / 2)
        }
    assert not (tmp_path / "runs" / "r0" / "evaluation.json").exists()
    assert {
        r["status"]
        for r in run_group(runs, str(tmp_path), str(shared_data_dir), 1, eval_k=8, n_test=10)
    } == {"done"}
    for r, timing in zip(("r0", "r1"), before):
        after = json.loads((tmp_path / "runs" / r / "runner.json").read_text())
        assert {k: after[k] for k in timing} == timing and after["eval_wall_s"] > 0


def test_training_time_is_kept_by_machine_when_a_run_moves(monkeypatch):
    """A run trained on a GPU for one job's time and continued on a CPU keeps both machines'
    seconds, and its share of them where it trained in a lockstep group."""
    timing = {}
    steps = (
        ("cuda (NVIDIA H100 80GB HBM3)", 300.0, 4),
        ("cpu (AMD EPYC)", 60.0, 1),
        ("cpu (AMD EPYC)", 40.0, 2),
    )
    for (
        label,
        seconds,
        group,
    ) in steps:  # 300 s in a lockstep group of 4 runs, then 60 s alone, 40 s in a pair
        monkeypatch.setattr(worker, "_device_label", lambda label=label: label)
        timing = worker._add_train_time(timing, seconds, group)
    assert timing == {
        "train_wall_s": 400.0,
        "train_wall_s_by_device": {"cuda (NVIDIA H100 80GB HBM3)": 300.0, "cpu (AMD EPYC)": 100.0},
        "train_share_s_by_device": {"cuda (NVIDIA H100 80GB HBM3)": 75.0, "cpu (AMD EPYC)": 80.0},
    }
    monkeypatch.undo()  # the real one names this machine
    assert worker._device_label().startswith("cuda (" if torch.cuda.is_available() else "cpu (")


def test_cli_time_limit(tmp_path, capsys):
    """``iwae train --time-limit`` exits with code 3 and says how to continue; ``--resume``
    finishes the run; ``iwae reproduce --time-limit`` starts nothing once the limit has
    passed and exits with 3; a limit must be positive."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", train=rng.random((60, 8, 8)), test=rng.random((20, 8, 8)))
    run = tmp_path / "run"
    base = [
        "train",
        "--dataset",
        str(tmp_path / "d.npz"),
        "--latent",
        "2",
        "--hidden",
        "8",
        "--stages",
        "2",
        "--eval-n",
        "10",
        "--stage-nll-k",
        "0",
        "--quiet",
    ]
    assert main([*base, "--out", str(run), "--time-limit", "1e-9"]) == 3
    err = capsys.readouterr().err
    assert "time limit reached" in err and "pass 1, step 1 of 4" in err and "--resume" in err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["passes"] == 4
    assert (
        main(
            [
                "reproduce",
                "table1",
                "--stages",
                "1",
                "--only",
                "dataset=mnist",
                "--only",
                "k=1",
                "--out",
                str(tmp_path / "exp"),
                "--time-limit",
                "1e-9",
                "--quiet",
            ]
        )
        == 3
    )
    out = capsys.readouterr().out
    assert "4 stopped at the time limit" in out and not list((tmp_path / "exp" / "runs").iterdir())
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "x"), "--time-limit", "0"])
