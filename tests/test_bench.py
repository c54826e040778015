"""Smoke test of the benchmark: `bench/run.py --quick --no-pythae` runs, writes the
documented JSON keys, and its correctness check (fast evaluation against a float64
torch.distributions reference fed the same eps) passes; `bench/compare.py` times two
checkouts in rounds; `bench/precision_quality.py` computes its paired differences."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python bench/SCRIPT ARGS`` on one thread (unless OMP_NUM_THREADS says otherwise);
    it must exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


@pytest.mark.slow
def test_bench_quick(tmp_path):
    out = tmp_path / "results.json"
    _bench("run.py", "--quick", "--no-pythae", "--out", str(out))
    r = json.loads(out.read_text())
    for key in (
        "train_vs_pythae",
        "train_k5_vs_pythae",
        "eval_vs_pythae",
        "train_roofline_fraction",
        "eval_roofline_fraction",
        "correctness_passed",
        "meta",
        "roofline",
        "flops",
        "train",
        "eval",
        "correctness",
        "memory_by_phase",
    ):
        assert key in r, key
    for key in ("date", "torch", "cpu", "cpu_model", "threads"):
        assert r["meta"][key], key
    # denormals: k=50 steps flushed / not, on a model trained for a pass (real MNIST beside the
    # checkout)
    if r["ftz"] is not None:
        assert r["ftz_speedup_k50"] == pytest.approx(
            r["ftz"]["examples_per_s_flushed"] / r["ftz"]["examples_per_s_not_flushed"]
        )
        assert r["ftz_speedup_k50"] > 0 and r["ftz"]["warm_pass_seconds"] > 0
    assert r["train_vs_pythae_ftz"] is None  # --no-pythae
    assert r["train_vs_pythae_tuned"] is None
    assert set(r["lockstep_speedup"]) == {"1", "5", "50"} and all(
        v > 0 for v in r["lockstep_speedup"].values()
    )
    if r["grid"] is not None:
        assert r["grid_speedup"] == pytest.approx(
            r["grid"]["seconds"]["one_run_per_process"] / r["grid"]["seconds"]["lockstep"]
        )
    # lockstep groups on --device (auto: the CPU here), trained by iwae.train.train_lockstep
    if r["groups"] is not None:
        assert r["groups"]["device"] == "cpu" or "skipped" in r["groups"] or r["groups"]["gpu"]
        for row in r["groups"].get("rows", []):
            assert row["group_steps_per_s"] > 0
            assert row["model_steps_per_s"] == pytest.approx(
                row["group"] * row["group_steps_per_s"], rel=1e-2
            )
    assert r["train_vs_pythae"] is None and r["eval_vs_pythae"] is None  # --no-pythae
    assert 0 < r["train_roofline_fraction"] < 1.5 and 0 < r["eval_roofline_fraction"] < 1.5
    configs = {(t["layers"], t["k"], t["batch"]) for t in r["train"]["iwae"]}
    assert {(l, k, b) for l in (1, 2) for k in (1, 5, 50) for b in (20, 100)} <= configs
    assert all(t["examples_per_s"] > 0 for t in r["train"]["iwae"])
    assert {e["layers"] for e in r["eval"]["iwae"]} == {1, 2}
    assert r["flops"]["train_per_example"]["L1_k50"] == pytest.approx(63.03e6, rel=1e-3)
    assert r["correctness"]["passed"] and r["correctness_passed"]
    assert all(c["max_abs_diff_per_example"]["log_px"] <= 1e-3 for c in r["correctness"]["checks"])


@pytest.mark.slow
def test_compare_times_two_checkouts_in_rounds(tmp_path):
    """bench/compare.py against this same checkout (quick, no pythae): each round has both
    arms' three rates, and each summarized ratio is the median of the per-round ratios."""
    out = tmp_path / "compare.json"
    proc = _bench(
        "compare.py", "--baseline", str(ROOT), "--rounds", "2", "--quick", "--no-pythae",
        "--out", str(out),
    )  # fmt: skip
    r = json.loads(out.read_text())
    assert "this_vs_pythae" not in r and len(r["rounds"]) == 2
    assert list(r["rounds"][0]) == ["this", "baseline"]
    assert list(r["rounds"][1]) == ["baseline", "this"]  # each arm first in turn
    for key in ("train_k50", "train_k5", "eval"):
        ratios = [x["this"][key] / x["baseline"][key] for x in r["rounds"]]
        assert r["this_vs_baseline"][key]["rounds"] == pytest.approx(ratios)
        assert r["this_vs_baseline"][key]["median"] == pytest.approx(sum(ratios) / 2)
    assert "this_vs_baseline" in proc.stdout


def _precision_run(root, precision, seed, log_px, index, train_seconds):
    """A run directory as scripts/precision.sh leaves it (the files the analysis reads)."""
    from iwae.rundir import write_evaluation

    d = root / f"mnist-l1-iwae-k50-{precision}-s{seed}"
    d.mkdir()
    config = {"dataset": "mnist", "k": 50, "precision": precision, "seed": seed}
    (d / "config.json").write_text(json.dumps(config))
    (d / "summary.json").write_text(json.dumps({"train_seconds": train_seconds}))
    log_px = torch.tensor(log_px, dtype=torch.float64)
    result = {"nll": float(-log_px.mean()), "n_test": len(log_px), "k": 5000}
    write_evaluation(d, result, {"log_px": log_px}, index)


def test_precision_quality_pairs_seeds_and_images(tmp_path, capsys):
    """bench/precision_quality.py: per seed, NLL(bf16) - NLL(fp32) paired over the common
    test images; over seeds, the mean and the seeds' standard error, and the verdict."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "precision_quality", ROOT / "bench" / "precision_quality.py"
    )
    pq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pq)
    # seed 0: images 1, 2 and 3 in common; differences (bf16 worse by) 1, 2, 3 nats
    _precision_run(tmp_path, "fp32", 0, [-90.0, -91.0, -92.0, -50.0], [1, 2, 3, 9], 100.0)
    _precision_run(tmp_path, "bf16", 0, [-95.0, -91.0, -93.0], [3, 1, 2], 50.0)
    # seed 1: differences -1 and +1
    _precision_run(tmp_path, "fp32", 1, [-90.0, -90.0], [0, 1], 90.0)
    _precision_run(tmp_path, "bf16", 1, [-89.0, -91.0], [0, 1], 60.0)
    out = tmp_path / "quality.json"
    assert pq.main([str(tmp_path), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    s0, s1 = r["per_seed"]["0"], r["per_seed"]["1"]
    assert (s0["images"], s0["diff"], s0["diff_se"]) == (3, 2.0, pytest.approx(1 / math.sqrt(3)))
    assert (s1["diff"], s1["diff_se"]) == (0.0, pytest.approx(1.0))
    assert s0["bf16_speedup"] == 2.0 and s1["bf16_speedup"] == 1.5
    # over seeds: mean 1.0, se = std([2, 0]) / sqrt(2) = 1.0: within 2 se of 0
    assert r["diff"] == 1.0 and r["diff_se_over_seeds"] == pytest.approx(1.0)
    assert r["diff_se_paired_images"] == pytest.approx(math.sqrt(1 / 3 + 1) / 2)
    assert r["within_noise"] is True
    assert "mean over 2 seed(s): +1.000 nats ± 1.000 (seeds)" in capsys.readouterr().out
    # another configuration in the same directory is refused
    (tmp_path / "mnist-l1-iwae-k50-bf16-s1" / "config.json").write_text(
        json.dumps({"dataset": "mnist", "k": 5, "precision": "bf16", "seed": 1})
    )
    with pytest.raises(SystemExit, match="not one configuration"):
        pq.main([str(tmp_path)])


def test_the_bench_starts_iwae_workers_with_the_librarys_memory_setting():
    """bench/run.py cannot import iwae (no torch there): its environment variables must
    hold iwae.memory's thresholds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import run as bench_run

    from iwae import memory

    assert bench_run.REUSE_FREED_MEMORY_ENV == {
        "MALLOC_MMAP_THRESHOLD_": str(memory.REUSE_MMAP_THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": str(memory.REUSE_TRIM_THRESHOLD),
    }


def test_profile_step_splits_a_step_by_kind(tmp_path):
    """bench/profile_step.py on synthetic images: the step's self CPU time by kind, the
    matrix products' part of it, and the operators called a step."""
    out = tmp_path / "profile.json"
    proc = _bench(
        "profile_step.py",
        "--k",
        "3",
        "--steps",
        "3",
        "--data-dir",
        str(tmp_path / "none"),
        "--precision",
        "fp32",
        "--out",
        str(out),
    )
    r = json.loads(out.read_text())
    assert r["data"].startswith("synthetic") and r["settings"]["k"] == 3
    assert set(r["self_ms_per_step"]) == {"matmul", "casts", "adam", "other operators"}
    assert r["self_ms_per_step"]["matmul"] > 0 and r["operator_calls_per_step"] > 50
    assert r["ms_per_step"] > 0 and len(r["top_operators"]) == 12
    assert "not in operators" in proc.stdout


def test_time_course_counts_every_step_in_windows(monkeypatch):
    """bench/_common.time_course: each window closes at the first step past its length and
    counts that window's steps; the run ends at the first window end past ``seconds``."""
    sys.path.insert(0, str(ROOT / "bench"))
    import _common

    clock = {"t": 0.0}
    monkeypatch.setattr(_common.time, "perf_counter", lambda: clock["t"])

    def step():  # 0.3 s a step
        clock["t"] += 0.3

    r = _common.time_course(step, seconds=2.0, window_s=1.0)
    # windows close after steps 4 (1.2 s), 8 (2.4 s): 4 steps of 0.3 s each, 1.2 s a window
    assert [w["steps"] for w in r["windows"]] == [4, 4]
    assert [w["steps_total"] for w in r["windows"]] == [4, 8]
    assert [w["end_s"] for w in r["windows"]] == pytest.approx([1.2, 2.4])
    assert [w["steps_per_s"] for w in r["windows"]] == pytest.approx([4 / 1.2, 4 / 1.2])


@pytest.mark.slow
def test_bench_course_quick_without_pythae(tmp_path):
    """`bench/run.py --only course --quick --no-pythae`: iwae's k=50 rate per window from
    initialization, pythae's columns empty."""
    out = tmp_path / "course.json"
    proc = _bench("run.py", "--only", "course", "--quick", "--no-pythae", "--out", str(out))
    r = json.loads(out.read_text())
    assert r["job"] == {"layers": 1, "k": 50, "batch": 20} and r["precision"] in ("fp32", "bf16")
    assert len(r["windows"]) == 3 and set(r["runs"]) == {"iwae"}
    seen = [w["examples_seen"] for w in r["windows"]]
    assert seen == sorted(seen) and seen[0] > 0
    for w in r["windows"]:
        assert w["iwae_examples_per_s"] > 0 and w["end_s"] >= 1.0 * (w["window"] + 1)
        assert w["pythae_examples_per_s"] is None and w["iwae_vs_pythae"] is None
    assert "iwae images" in proc.stdout
