"""Experiment grids, the resumable runner (local processes and Ray), the report, and the toy."""

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import safetensors.torch
import torch

import iwae.experiments as ex
from iwae.cli import build_parser, main, parse_only
from iwae.errors import IwaeError
from iwae.experiments import (
    EXPERIMENTS,
    VARIANTS,
    Run,
    _select,
    grid,
    reproduce,
    reuse_runs,
    run_one,
    toy,
)
from iwae.report import paper_tables, write_report
from iwae.schedule import run_tasks
from iwae.train import TrainConfig

TINY = dict(n_train=300, eval_n=50)  # every run of a test grid trains on 300 images


def test_grids_match_the_papers():
    table1 = grid("table1", stages=4)
    assert len(table1) == 24 and len({r.name for r in table1}) == 24
    paper_cells = {(r[0], r[1], r[2], r[3]) for r in paper_tables()["burda2016_table1"]["rows"]}
    assert {
        (r.config["dataset"], r.config["layers"], r.config["k"], r.config["objective"])
        for r in table1
    } == paper_cells
    assert all(TrainConfig(**r.config).total_passes == 40 for r in table1)

    two = grid("two-stage", stages=8)
    second = [r for r in two if r.after is not None]
    assert len(two) == 4 and len(second) == 2
    assert all(r.config["epochs"] == 3**7 and r.config["lr"] == 1e-4 for r in second)

    variants = grid("variants", stages=3, seeds=3)
    assert len(variants) == 24
    assert all(TrainConfig(**r.config).objective_spec.samples == 64 for r in variants)
    assert {key for _, key, _ in VARIANTS} == {
        r[0] for r in paper_tables()["rainforth2018_variants"]["rows"]
    }
    dreg = grid("dreg", stages=2)
    assert len(dreg) == 8 and {r.config["estimator"] for r in dreg} == {"reparam", "dreg"}
    assert all(
        TrainConfig(**r.config).objective_spec.estimator == r.label["estimator"] for r in dreg
    )
    with pytest.raises(IwaeError):
        grid("table2", 4)


def test_toy_is_exact_and_monotone():
    a, b = 1.0, 10.0
    r = toy(a, b, 300)
    assert r["expected_log_mean"][0] == pytest.approx((math.log(a) + math.log(b)) / 2)
    assert r["expected_log_mean"][1] == pytest.approx(
        (math.log(a) + 2 * math.log((a + b) / 2) + math.log(b)) / 4
    )
    assert all(y <= x for x, y in zip(r["bias"], r["bias"][1:]))
    assert 0 < r["bias"][-1] < 0.002  # shrinks like Var/(2 k E^2): 81/4/(2*300*5.5^2) = 0.0011
    assert r["bias"][-1] == pytest.approx(20.25 / (2 * 300 * 5.5**2), rel=0.05)


def test_toy_cli(tmp_path, capsys):
    assert main(["toy", "--a", "2", "--b", "5", "--k-max", "50", "--out", str(tmp_path)]) == 0
    assert "monotonically shrinking" in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "toy.json").read_text())["k"][-1] == 50
        and (tmp_path / "toy.png").exists()
    )
    assert main(["toy", "--a", "-1", "--out", str(tmp_path)]) == 2


def _sweep_cmd(out, data_dir, backend="local"):
    code = (
        f"import sys; from iwae.experiments import reproduce; reproduce('two-stage', {str(out)!r}, "
        f"stages=2, workers=2, backend={backend!r}, data_dir={str(data_dir)!r}, "
        f"overrides={TINY!r}, eval_k=64, n_test=50, progress=False)"
    )
    return [sys.executable, "-c", code]


def test_killed_sweep_resumes(shared_data_dir, tmp_path):
    """Kill a sweep (and its workers) once a run has finished; the rerun skips it and finishes
    the rest."""
    out = tmp_path / "exp"
    proc = subprocess.Popen(
        _sweep_cmd(out, shared_data_dir),
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 300
    while (
        not list(out.glob("runs/*/evaluation.json"))
        and time.monotonic() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name for p in out.glob("runs/*/evaluation.json")}
    assert finished, "no run finished before the kill"

    results = reproduce(
        "two-stage",
        out,
        stages=2,
        workers=2,
        data_dir=str(shared_data_dir),
        overrides=TINY,
        eval_k=64,
        n_test=50,
        progress=False,
    )
    status = {r["name"]: r["status"] for r in results}
    assert len(status) == 4 and all(status[name] == "skipped" for name in finished)
    assert all(s == "done" for name, s in status.items() if name not in finished)
    for run in out.glob("runs/*"):
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["pass"] for m in metrics] == list(
            range(1, len(metrics) + 1)
        )  # no pass lost or repeated
    # a different budget in the same directory is refused
    with pytest.raises(IwaeError, match="another --out"):
        reproduce("two-stage", out, stages=3, data_dir=str(shared_data_dir))

    report = write_report(out).read_text()
    assert "two-stage training" in report and "| 1 | vae |" in report
    assert (out / "figures" / "two-stage-curves.png").exists()
    assert (out / "figures" / "two-stage-activity.png").exists()
    assert len(list((out / "figures" / "samples").glob("*.png"))) == 4


def test_second_stage_starts_from_first_stage_weights(shared_data_dir, tmp_path):

    first = Run("a", dict(dataset="mnist", objective="vae", k=1, epochs=1, **TINY))
    run_one(vars(first), str(tmp_path), str(shared_data_dir), 1, eval_k=8, n_test=10)
    second = Run(
        "b", dict(dataset="mnist", objective="iwae", k=5, epochs=1, lr=1e-12, **TINY), after="a"
    )
    run_one(vars(second), str(tmp_path), str(shared_data_dir), 1, eval_k=8, n_test=10)
    a = safetensors.torch.load_file(tmp_path / "runs" / "a" / "model.safetensors")
    b = safetensors.torch.load_file(tmp_path / "runs" / "b" / "model.safetensors")
    assert all(torch.allclose(a[key], b[key], atol=1e-6) for key in a)  # lr ~ 0: unchanged


@pytest.mark.slow
def test_ray_backend_on_a_local_instance(shared_data_dir, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'iwae[ray]')")
    out = tmp_path / "exp"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RAY_ADDRESS": "local",
        "RAY_DISABLE_USAGE_STATS": "1",
    }
    r = subprocess.run(
        _sweep_cmd(out, shared_data_dir, backend="ray"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(out.glob("runs/*/evaluation.json"))) == 4
    again = reproduce(
        "two-stage",
        out,
        stages=2,
        backend="local",
        data_dir=str(shared_data_dir),
        overrides=TINY,
        eval_k=64,
        n_test=50,
        progress=False,
    )
    assert all(x["status"] == "skipped" for x in again)


def test_reproduce_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "table9", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_only_repeated_key_matches_any_of_its_values():
    only = parse_only(["method=IWAE", "method=PIWAE(4,16)", "seed=1", "method=IWAE"])
    assert only == {"method": ["IWAE", "PIWAE(4,16)"], "seed": "1"}
    picked = _select(grid("variants", stages=1, seeds=2), "variants", only)
    assert [r.name for r in picked] == ["mnist-l1-iwae-k64-s1", "mnist-l1-piwae-m4k16-s1"]
    both = _select(
        grid("variants", stages=1, seeds=2), "variants", parse_only(["method=VAE", "method=IWAE"])
    )
    assert sorted(r.label["method"] for r in both) == ["IWAE", "IWAE", "VAE", "VAE"]
    with pytest.raises(IwaeError, match="KEY=VALUE"):
        parse_only(["method"])
    with pytest.raises(IwaeError, match="no run of variants"):
        _select(grid("variants", stages=1, seeds=2), "variants", {"method": ["nothing", "else"]})


def test_runner_reevaluates_a_run_evaluated_with_other_settings(shared_data_dir, tmp_path):
    run = vars(Run("a", dict(dataset="mnist", objective="vae", k=1, epochs=1, **TINY)))
    assert (
        run_one(run, str(tmp_path), str(shared_data_dir), 1, eval_k=8, n_test=10)["status"]
        == "done"
    )
    trained = (tmp_path / "runs" / "a" / "model.safetensors").stat().st_mtime_ns
    assert (
        run_one(run, str(tmp_path), str(shared_data_dir), 1, eval_k=8, n_test=10)["status"]
        == "skipped"
    )
    again = run_one(run, str(tmp_path), str(shared_data_dir), 1, eval_k=16, n_test=10)
    assert again["status"] == "done" and again["k"] == 16
    assert (
        tmp_path / "runs" / "a" / "model.safetensors"
    ).stat().st_mtime_ns == trained  # not retrained


def test_experiment_lists_the_runs_of_every_invocation(shared_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(
        ex,
        "_execute_local",
        lambda tasks, *args: [{"name": r.name, "status": "done"} for t in tasks for r in t],
    )
    ex.reproduce(
        "table1", tmp_path, stages=1, only={"layers": "1", "k": "5"}, data_dir=str(shared_data_dir)
    )
    ex.reproduce(
        "table1", tmp_path, stages=1, only={"layers": "2", "k": "50"}, data_dir=str(shared_data_dir)
    )
    meta = json.loads((tmp_path / "experiment.json").read_text())
    assert len(meta["runs"]) == 8 and len(meta["only"]) == 2
    # the same command again (a resumed run) lists its selection once
    ex.reproduce(
        "table1", tmp_path, stages=1, only={"layers": "2", "k": "50"}, data_dir=str(shared_data_dir)
    )
    meta = json.loads((tmp_path / "experiment.json").read_text())
    assert len(meta["runs"]) == 8
    assert meta["only"] == [{"layers": "1", "k": "5"}, {"layers": "2", "k": "50"}]


def test_cli_choices_and_default_seeds_come_from_the_registry():

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    experiment = next(a for a in sub.choices["reproduce"]._actions if a.dest == "experiment")
    assert list(experiment.choices) == list(EXPERIMENTS)
    for name, e in EXPERIMENTS.items():
        assert e.name == name and e.description
        assert {r.label["seed"] for r in grid(name, stages=1)} == set(range(e.seeds))


def test_reproduce_takes_runner_options_or_their_keywords(shared_data_dir, tmp_path, monkeypatch):
    """``reproduce(..., options=RunnerOptions(...), **keywords)``: the keywords change the
    options given; the tasks' shared settings come from them; bad options are refused."""
    seen = []
    monkeypatch.setattr(
        ex,
        "_execute_local",
        lambda tasks, work, options: (
            seen.append((work, options))
            or [{"name": r.name, "status": "done"} for t in tasks for r in t]
        ),
    )
    only = {"dataset": "mnist", "layers": "1", "k": "5"}
    options = ex.RunnerOptions(threads=3, eval_k=64, cuda_graphs="off")
    kw = dict(stages=1, only=only, data_dir=str(shared_data_dir), options=options)
    ex.reproduce("table1", tmp_path, **kw)
    more = dict(n_test=10, time_limit=5)
    ex.reproduce("table1", tmp_path, **kw, **more)
    (first, a), (second, b) = seen
    assert a == options and b == ex.RunnerOptions(
        threads=3, eval_k=64, cuda_graphs="off", n_test=10, time_limit=5
    )
    assert (first.threads, first.eval_k, first.n_test, first.cuda_graphs) == (3, 64, None, "off")
    assert first.stop_at is None and second.stop_at > time.time() + 240
    assert json.loads((tmp_path / "experiment.json").read_text())["n_test"] == 10
    for bad in (dict(workers=0), dict(group_size=0), dict(time_limit=0), dict(backend="slurm")):
        with pytest.raises(IwaeError):
            ex.reproduce("table1", tmp_path, stages=1, data_dir=str(shared_data_dir), **bad)
    with pytest.raises(TypeError):
        ex.reproduce("table1", tmp_path, stages=1, workres=2)


class _InProcess:
    """An executor that runs each call when it is submitted: the scheduling loop alone."""

    def __init__(self):
        self.submitted, self.results = [], {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def submit(self, fn, *args):
        self.submitted.append([r.name for r in args[0]])
        self.results[len(self.submitted)] = fn(*args)
        return len(self.submitted)

    def wait_any(self, handles):
        return handles[:1]

    def result(self, handle):
        return self.results[handle]


def test_one_scheduling_loop_starts_a_task_once_the_runs_it_continues_are_done():
    tasks = [(r,) for r in grid("two-stage", stages=1)]
    executor = _InProcess()
    results = run_tasks(
        tasks, executor, lambda task: [{"name": r.name, "status": "done"} for r in task], False
    )
    assert sorted(r["name"] for r in results) == sorted(t[0].name for t in tasks)
    position = {names[0]: i for i, names in enumerate(executor.submitted)}
    assert all(position[t[0].after] < position[t[0].name] for t in tasks if t[0].after)


def test_report_states_whether_table1_orderings_hold(tmp_path):
    """Table 1 from hand-made evaluations: the report's table and its verdicts on the orderings."""
    runs = [
        r
        for r in grid("table1", stages=2)
        if r.label["dataset"] == "mnist" and r.label["layers"] == 1
    ]
    nll = {
        ("vae", 1): 95.0,
        ("iwae", 1): 95.0,
        ("vae", 5): 94.0,
        ("iwae", 5): 93.0,
        ("vae", 50): 92.0,
        ("iwae", 50): 92.5,
    }
    units = {
        ("vae", 1): 20,
        ("iwae", 1): 20,
        ("vae", 5): 21,
        ("iwae", 5): 24,
        ("vae", 50): 22,
        ("iwae", 50): 25,
    }

    def evaluation(r):
        key = (r.label["objective"], r.label["k"])
        return {"nll": nll[key], "active_units": [units[key]], "iwae64": 0}

    _fake_experiment(
        tmp_path, "table1", runs, evaluation, seeds=1, only={"dataset": "mnist", "layers": "1"}
    )
    text = write_report(tmp_path).read_text()
    assert (
        "| mnist | 1 | 5 | 94.00 | 86.47 | 7.53 | 93.00 | 85.54 | 7.46 | 21 | 20 | 24 | 22 |"
        in text
    )
    assert "6 of 6 runs finished (selected with --only: 6 of the grid's 24 runs)" in text
    assert "## Burda et al. (2016), Table 1 (MNIST)\n" in text
    assert (
        "IWAE below VAE in NLL for every k > 1 — **does not hold** (k=5: IWAE 93.00 vs VAE 94.00, "
        "k=50: IWAE 92.50 vs VAE 92.00)" in text
    )
    assert "IWAE NLL falling with k — **holds** (k=1: 95.00, k=5: 93.00, k=50: 92.50)" in text
    assert "at least as many active units as VAE — **holds**" in text
    assert (tmp_path / "figures" / "table1-activity.png").exists()


def _fake_experiment(tmp_path, name, runs, evaluation_of, **meta):
    """An experiment directory with hand-made evaluations (no training); ``meta`` overrides
    keys of its experiment.json."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "experiment.json").write_text(
        json.dumps(
            {
                "experiment": name,
                "stages": 2,
                "seeds": 2,
                "passes_per_run": 4,
                "eval_k": 5000,
                "n_test": None,
                "runs": [asdict(r) for r in runs],
                **meta,
            }
        )
    )
    for r in runs:
        d = tmp_path / "runs" / r.name
        d.mkdir(parents=True)
        evaluation = evaluation_of(r)
        (d / "evaluation.json").write_text(json.dumps(evaluation))
        units = evaluation["active_units"][0]
        (d / "activity.json").write_text(
            json.dumps({"unit_activity": [[0.5] * units + [0.001] * 5]})
        )


def test_report_states_whether_two_stage_findings_hold(tmp_path):
    nll = {(1, "first"): 95.0, (1, "second"): 94.0, (2, "first"): 93.0, (2, "second"): 92.5}
    units = {(1, "first"): 20, (1, "second"): 22, (2, "first"): 25, (2, "second"): 25}

    def evaluation(r):
        key = (r.label["experiment"], r.label["stage"])
        return {"nll": nll[key], "active_units": [units[key]], "iwae64": 0}

    _fake_experiment(tmp_path, "two-stage", grid("two-stage", stages=2), evaluation)
    text = write_report(tmp_path).read_text()
    assert "| 1 | vae | 95.00 | 86.76 | 20 | 19 | iwae k=50 | 94.00 | 84.88 | 22 | 22 |" in text
    assert (
        "vae then iwae k=50: the second stage lowers the NLL (paper 86.76 → 84.88) — **holds** "
        "(95.00 → 94.00)" in text
    )
    assert (
        "vae then iwae k=50: the second stage adds active units (paper 19 → 22) — **holds** (20 → "
        "22)" in text
    )
    assert (
        "iwae k=50 then vae: the second stage raises the NLL (paper 84.78 → 86.02) — **does not "
        "hold** (93.00 → 92.50)" in text
    )
    assert (
        "iwae k=50 then vae: the second stage removes active units (paper 25 → 23) — **does not "
        "hold** (25 → 25)" in text
    )


def test_report_states_whether_variant_findings_hold(tmp_path):
    runs = grid("variants", stages=2, seeds=2)
    base = {
        "IWAE": (-95.0, -93.0),
        "VAE": (-96.0, -95.5),
    }  # (iwae64, log_px) before the seed offset

    def evaluation(r):
        iwae64, log_px = base.get(r.label["method"], (-94.5, -93.2))
        if r.label["method"] == "CIWAE beta=0.5":
            iwae64 = -95.5  # below IWAE: the first finding must fail
        iwae64 += 0.2 * r.label["seed"]
        return {
            "iwae64": iwae64,
            "log_px": log_px,
            "neg_kl_q_p": iwae64 - log_px,
            "nll": -log_px,
            "active_units": [20],
        }

    _fake_experiment(tmp_path, "variants", runs, evaluation)
    text = write_report(tmp_path).read_text()
    assert "| IWAE | -94.90 ± 0.14 | -86.11 ± 0.10 | -93.00 ± 0.00 |" in text
    assert (
        "PIWAE, MIWAE and CIWAE above IWAE in IWAE-64 (paper: −85.60 to −86.08 vs −86.11) — "
        "**does not hold** (IWAE -94.90;" in text
    )
    assert "CIWAE beta=0.5 -95.40" in text
    # CIWAE beta=0.5 (-95.4 - -93.2 = -2.2) is below IWAE's -1.9 in -KL(Q||P) too; the others
    # above it
    assert (
        "every other method above IWAE in −KL(Q‖P), a better inference network (paper: −0.47 to "
        "−1.34 vs −1.59) — **does not hold** (IWAE -1.90; PIWAE(4,16) -1.20,"
    ) in text
    assert "CIWAE beta=0.5 -2.20, VAE -0.40)" in text
    assert (
        "the VAE lowest in log p̂(x), the worst generative model (paper: −86.21 vs −84.40 to "
        "−85.24) — **holds** (VAE -95.50;" in text
    )


def test_reuse_copies_finished_runs_with_identical_configurations(tmp_path, capsys):
    """two-stage's first stages are table1 runs: --reuse copies them (not their checkpoints or
    logs), never a run that differs, starts from another run, or already exists here."""
    source = tmp_path / "table1"
    for run in grid("table1", stages=2):
        d = source / "runs" / run.name
        d.mkdir(parents=True)
        (d / "config.json").write_text(
            json.dumps(TrainConfig(**run.config, data_dir="/elsewhere").to_dict())
        )
        for name in (
            "summary.json",
            "metrics.jsonl",
            "model.safetensors",
            "checkpoint.safetensors",
        ):
            (d / name).write_text("{}" if name.endswith(".json") else run.name)
        (d / "tb").mkdir()
        (d / "evaluation.json").write_text(
            json.dumps({"k": 64, "n_test": 50, "test_subset_seed": 0, "nll": 90.0})
        )
    unfinished = source / "runs" / "mnist-l1-iwae-k50-s0" / "summary.json"
    unfinished.unlink()  # training not finished there: not reusable

    out = tmp_path / "two-stage"
    (out / "runs" / "exp2-first-iwae-k50-s0").mkdir(parents=True)
    runs = grid("two-stage", stages=2)
    assert (
        reuse_runs(
            grid("two-stage", stages=3),
            tmp_path / "other",
            [source],
            data_dir="/here",
            progress=False,
        )
        == []
    )
    copied = reuse_runs(runs, out, [source], data_dir="/here", progress=False)
    assert copied == [
        "exp1-first-vae-k1-s0"
    ]  # exp2's first stage exists here; its source is unfinished anyway
    run_dir = out / "runs" / "exp1-first-vae-k1-s0"
    assert (run_dir / "model.safetensors").read_text() == "mnist-l1-vae-k1-s0"
    assert not (run_dir / "checkpoint.safetensors").exists() and not (run_dir / "tb").exists()
    assert json.loads((run_dir / "runner.json").read_text())["reused_from"].endswith(
        "mnist-l1-vae-k1-s0"
    )
    assert not list((out / "runs").glob("*.copying"))
    # copied with a matching evaluation: the runner neither trains nor evaluates it again
    status = run_one(vars(runs[0]), str(out), "/here", 1, eval_k=64, n_test=50)
    assert status == {"name": "exp1-first-vae-k1-s0", "status": "skipped"}
    with pytest.raises(IwaeError, match="not an experiment directory"):
        reuse_runs(runs, out, [tmp_path / "nothing"], data_dir=None)


def test_report_keeps_the_figures_of_two_table1_directories_apart(tmp_path):
    runs = grid("table1", stages=2)

    def evaluation(r):
        return {"nll": 90.0 + r.label["k"], "active_units": [20] * r.label["layers"], "iwae64": 0}

    _fake_experiment(
        tmp_path / "table1-mnist",
        "table1",
        [r for r in runs if r.label["dataset"] == "mnist"],
        evaluation,
    )
    _fake_experiment(
        tmp_path / "table1-omniglot",
        "table1",
        [r for r in runs if r.label["dataset"] == "omniglot"],
        evaluation,
    )
    text = write_report(tmp_path).read_text()
    assert "Table 1 (MNIST)" in text and "Table 1 (OMNIGLOT)" in text
    for name in ("table1-mnist", "table1-omniglot"):
        assert f"![unit activity](figures/{name}-activity.png)" in text
        assert (tmp_path / "figures" / f"{name}-activity.png").exists()


def test_reuse_takes_vae_k1_for_iwae_k1_and_nothing_else(tmp_path):
    """VAE and IWAE with k=1 are one objective (L_1, bit for bit): a finished IWAE k=1 run
    is reused for the VAE k=1 cell; at k=5 they differ and nothing is copied."""
    runs = [
        r
        for r in grid("table1", stages=2)
        if r.label["dataset"] == "mnist" and r.label["layers"] == 1
    ]
    source = tmp_path / "src"
    for run in runs:
        if run.label["objective"] == "iwae":
            d = source / "runs" / run.name
            d.mkdir(parents=True)
            (d / "config.json").write_text(json.dumps(TrainConfig(**run.config).to_dict()))
            (d / "summary.json").write_text("{}")
            (d / "model.safetensors").write_text(run.name)
    vae = [r for r in runs if r.label["objective"] == "vae"]
    copied = reuse_runs(vae, tmp_path / "out", [source], data_dir=None, progress=False)
    assert copied == ["mnist-l1-vae-k1-s0"]
    assert (
        tmp_path / "out" / "runs" / "mnist-l1-vae-k1-s0" / "model.safetensors"
    ).read_text() == "mnist-l1-iwae-k1-s0"
    dreg = [
        Run("x", dict(dataset="mnist", layers=1, objective="vae", k=1, estimator="dreg", stages=2))
    ]
    assert reuse_runs(dreg, tmp_path / "out2", [source], data_dir=None, progress=False) == []


def test_runs_resume_where_their_data_has_moved(shared_data_dir, tmp_path, capsys):
    """A run directory records the data directory it was trained with; continued on another
    machine (found on a GPU machine: the data elsewhere) the runner reads the data from its own
    --data-dir, for single runs and lockstep groups alike, and ``iwae train --resume`` takes
    --data-dir. Without it, the error names the recorded directory."""
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(shared_data_dir / "mnist", old / "mnist")
    out = tmp_path / "exp"
    only = {"dataset": "mnist", "layers": 1}
    kw = dict(stages=1, overrides=TINY, eval_k=16, n_test=20, progress=False)
    for k in (1, 50):  # k=1: the VAE and IWAE in one lockstep group; k=50: single runs on the CPU
        reproduce("table1", out, data_dir=str(old), only={**only, "k": k}, **kw)
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 4 and all((r / "checkpoint.safetensors").exists() for r in runs)
    for r in runs:  # interrupted at their last checkpoint
        for name in ("summary.json", "evaluation.json"):
            (r / name).unlink()
    old.rename(new)
    cli_run = out / "runs" / "mnist-l1-iwae-k50-s0"
    assert main(["train", "--resume", str(cli_run), "--quiet"]) == 2
    assert str(old / "mnist") in capsys.readouterr().err
    assert main(["train", "--resume", str(cli_run), "--data-dir", str(new), "--quiet"]) == 0
    for k in (1, 50):
        results = reproduce("table1", out, data_dir=str(new), only={**only, "k": k}, **kw)
        assert {r["status"] for r in results} == {"done"}
    assert all((r / "evaluation.json").exists() for r in runs)
