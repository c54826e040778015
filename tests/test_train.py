"""Training runs: schedule, exact resume after SIGKILL, checkpoints, the non-finite guard,
configs."""

import json
import os
import pickle
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import iwae.engine
import iwae.steppers
from iwae.bounds import Objective
from iwae.checkpoint import generator_state
from iwae.cli import main
from iwae.data import Dataset, binarize_fixed, test_subset_indices
from iwae.errors import IwaeError, RunDirError
from iwae.model import LOG_STD_LIMIT, VAE, GaussianLayer, ModelConfig
from iwae.train import (
    CHECKPOINT_FILE,
    SMALL_STEP_ROWS,
    TrainConfig,
    adam,
    auto_threads,
    flush_denormals,
    load_run,
    read_metrics,
    resume,
    train,
    train_step,
)

SMALL_MODEL = {"x_dim": 784, "latent": [8], "hidden": [[32]], "scale": "exp"}


def synthetic(n=400, seed=0) -> Dataset:
    """Grey images with structure: two prototypes plus noise."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 1, (2, 784)) ** 3
    which = rng.integers(0, 2, n + 100)
    x = np.clip(protos[which] + rng.normal(0, 0.05, (n + 100, 784)), 0, 1).astype(np.float32)
    return Dataset("mnist", x[:n], x[n:])


def small_config(**kw) -> TrainConfig:
    """A tiny run in fp32, the numbers of which do not hang on a timing (the default, auto,
    times both precisions: tests/test_precision.py)."""
    base = dict(
        objective="iwae",
        k=3,
        stages=3,
        model=SMALL_MODEL,
        eval_n=50,
        eval_every=2,
        precision="fp32",
    )
    return TrainConfig(**{**base, **kw})


def weights(run: Path) -> dict:
    return safetensors.torch.load_file(run / "model.safetensors")


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_schedule_is_burdas():
    config = TrainConfig(stages=8)
    sched = config.schedule()
    assert [p for _, p, _ in sched] == [3**i for i in range(8)] and config.total_passes == 3280
    assert sched[7][2] == pytest.approx(1e-3 * 10 ** (-1))
    assert TrainConfig(stages=3).total_passes == 13
    assert TrainConfig(epochs=5).schedule() == [(0, 5, 1e-3)]


def test_auto_threads():
    assert auto_threads(20 * 5, cores=2) == 1 and auto_threads(20, cores=16) == 1
    assert auto_threads(20 * 50, cores=2) == 2 and auto_threads(SMALL_STEP_ROWS, cores=8) == 8


def test_run_directory_and_metrics(tmp_path):
    summary = train(small_config(), tmp_path / "run", dataset=synthetic(), progress=False)
    run = tmp_path / "run"
    assert summary["passes"] == 13
    metrics = read_metrics(run)
    assert [m["pass"] for m in metrics] == list(range(1, 14))
    assert {m["stage"] for m in metrics} == {0, 1, 2}
    assert all(m["skipped_steps"] == 0 for m in metrics)
    # the test bound every 2 passes and at every stage end (passes 1, 4, 13)
    assert [m["pass"] for m in metrics if "test_iwae64" in m] == [1, 2, 4, 6, 8, 10, 12, 13]
    assert metrics[-1]["train_bound"] > metrics[0]["train_bound"]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    config, model = load_run(run)
    assert config == small_config()
    # at every stage end the test NLL with 5,000 samples on the logged random test subset
    staged = [m for m in metrics if "test_nll_subset" in m]
    assert [m["pass"] for m in staged] == [1, 4, 13]
    assert all((m["test_nll_subset_k"], m["test_nll_subset_n"]) == (5000, 50) for m in staged)
    x = torch.from_numpy(binarize_fixed(synthetic().test, seed=0)[test_subset_indices(100, 50)])
    log_w = model.log_weights(
        x, 5000, torch.Generator().manual_seed(13)
    ).detach()  # independent of evaluate's chunks
    exact = -(torch.logsumexp(log_w.double(), 0) - np.log(5000)).mean().item()
    assert abs(staged[-1]["test_nll_subset"] - exact) < 0.05  # another draw of the same estimate
    assert all(m["test_nll_subset"] < -m["test_iwae64"] + 0.05 for m in staged)  # L_5000 above L_64
    with pytest.raises(RunDirError, match="not empty"):
        train(small_config(), run, dataset=synthetic(), progress=False)


def test_training_from_a_runs_config_reproduces_it(tmp_path):
    train(
        small_config(objective="piwae", m=2, k=2, stages=2),
        tmp_path / "a",
        dataset=synthetic(),
        progress=False,
    )
    config = TrainConfig.from_dict(json.loads((tmp_path / "a" / "config.json").read_text()))
    train(config, tmp_path / "b", dataset=synthetic(), progress=False)
    assert_bitwise_equal(weights(tmp_path / "a"), weights(tmp_path / "b"))


# -- exact resume ------------------------------------------------------------------------

_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import small_config, synthetic
from iwae.train import train, resume
torch.set_num_threads(1)
if sys.argv[1] == "new":
    config = small_config(stages=4, checkpoint_minutes=0.002)
    train(config, sys.argv[2], dataset=synthetic(2000), progress=False)
else:
    resume(sys.argv[2], dataset=synthetic(2000), progress=False)
"""


def _run_and_kill(mode: str, run: Path, rng: random.Random) -> int:
    """Start a child training process; once it has written a checkpoint of its own, SIGKILL
    it after a pause drawn from ``rng``. Returns its exit status: -SIGKILL if the kill
    caught it running, 0 if it had already finished."""
    code = _CHILD.format(tests=str(Path(__file__).parent))

    def checkpoint_id():
        try:
            stat = (
                run / CHECKPOINT_FILE
            ).stat()  # every checkpoint is a new file renamed into place
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    before = checkpoint_id()
    proc = subprocess.Popen([sys.executable, "-c", code, mode, str(run)])
    deadline = time.monotonic() + 120
    while checkpoint_id() == before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)  # does nothing to a child that has already exited
    proc.wait()
    return proc.returncode


def test_resume_after_sigkill_is_bitwise_equal(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed = 1509  # fixed: the same kill moments on every run
        rng = random.Random(seed)
        data = synthetic(2000)
        reference = tmp_path / "reference"
        train(
            small_config(stages=4, checkpoint_minutes=0.002),
            reference,
            dataset=data,
            progress=False,
        )

        run = tmp_path / "killed"
        for mode in ("new", "resume"):  # killed once while training, once while resuming
            status = _run_and_kill(mode, run, rng)
            assert status == -signal.SIGKILL, (
                f"{mode}: the child was not killed by SIGKILL (exit status {status})"
            )
            assert not (run / "summary.json").exists() and (run / CHECKPOINT_FILE).exists(), mode
            assert len(read_metrics(run)) < 40, (
                f"{mode}: the child finished its 40 passes before the kill"
            )
        resume(run, dataset=data, progress=False)
        assert_bitwise_equal(weights(reference), weights(run))
        ref_metrics, run_metrics = read_metrics(reference), read_metrics(run)
        assert [m["pass"] for m in run_metrics] == list(range(1, 41))
        for a, b in zip(ref_metrics, run_metrics):
            assert a["train_bound"] == b["train_bound"] and a.get("test_iwae64") == b.get(
                "test_iwae64"
            ), (seed, a, b)
    finally:
        torch.set_num_threads(threads)


_CHILD_BEFORE_CHECKPOINT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
import iwae.engine
import iwae.train
from test_train import small_config, synthetic
torch.set_num_threads(1)
def block(*args, **kwargs):  # the first checkpoint never comes: the parent kills the child here
    open(sys.argv[1] + ".blocked", "w").close()
    time.sleep(600)
iwae.engine.save_checkpoint = block  # the loop checkpoints through this name
iwae.train.train(small_config(stages=2), sys.argv[1], dataset=synthetic(), progress=False)
"""


def test_resume_before_the_first_checkpoint_starts_the_run_again(tmp_path, monkeypatch, capsys):
    """Killed with SIGKILL after its first pass (config.json, a metrics line, model.safetensors
    and TensorBoard events written) but before its first checkpoint: --resume starts the run
    again from config.json and ends with the uninterrupted run's weights, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = tmp_path / "reference"
        train(small_config(stages=2), reference, dataset=synthetic(), progress=False)
        run = tmp_path / "killed"
        code = _CHILD_BEFORE_CHECKPOINT.format(tests=str(Path(__file__).parent))
        proc = subprocess.Popen([sys.executable, "-c", code, str(run)])
        blocked, deadline = Path(str(run) + ".blocked"), time.monotonic() + 120
        while not blocked.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert not (run / CHECKPOINT_FILE).exists() and not (run / "summary.json").exists()
        assert [m["pass"] for m in read_metrics(run)] == [1] and (
            run / "model.safetensors"
        ).exists()
        monkeypatch.setattr("iwae.data.load_dataset", lambda *args, **kwargs: synthetic())
        assert main(["train", "--resume", str(run), "--quiet"]) == 0
        assert "no checkpoint" in capsys.readouterr().err
        assert_bitwise_equal(weights(reference), weights(run))
        assert [m["train_bound"] for m in read_metrics(run)] == [
            m["train_bound"] for m in read_metrics(reference)
        ]
    finally:
        torch.set_num_threads(threads)


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    run = tmp_path / "run"
    first = train(small_config(stages=1), run, dataset=synthetic(), progress=False)
    before = weights(run)
    assert resume(run, dataset=synthetic(), progress=False) == first
    assert_bitwise_equal(before, weights(run))


# -- bad checkpoints ---------------------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path):
    run = tmp_path / "run"
    train(small_config(stages=2), run, dataset=synthetic(), progress=False)
    (run / "summary.json").unlink()  # pretend it was interrupted after its last checkpoint
    return run


@pytest.mark.parametrize("damage", ["truncate", "header", "payload-size", "empty"])
def test_damaged_checkpoint_is_a_clear_error(finished_run, damage):
    path = finished_run / CHECKPOINT_FILE
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "header":
        data[10:30] = b"\xff" * 20
    elif damage == "payload-size":
        data += b"\0" * 8
    else:
        data = b""
    path.write_bytes(bytes(data))
    with pytest.raises(RunDirError, match=str(path)):
        resume(finished_run, dataset=synthetic(), progress=False)


def test_mismatched_checkpoint_is_a_clear_error(finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    config["model"]["latent"] = [9]
    (finished_run / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirError, match="does not match"):
        resume(finished_run, dataset=synthetic(), progress=False)
    with pytest.raises(RunDirError, match="does not match"):
        load_run(finished_run)


def test_checkpoint_state_metadata_is_validated(finished_run):
    path = finished_run / CHECKPOINT_FILE
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(tensors, path, metadata={"state": "{not json"})
    with pytest.raises(RunDirError, match="not a valid iwae checkpoint"):
        resume(finished_run, dataset=synthetic(), progress=False)


def test_loading_never_unpickles(finished_run):
    """A run directory is JSON and safetensors: a pickle planted as weights is refused, not run."""

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(finished_run / "pwned"),))

    (finished_run / "model.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(RunDirError, match="model.safetensors"):
        load_run(finished_run)
    assert not (finished_run / "pwned").exists()


# -- the non-finite guard ------------------------------------------------------------------


def _poison_log_weights(monkeypatch, bad_calls):
    calls = {"n": 0}
    original = VAE.log_weights

    def log_weights(self, x, k, generator=None, **kwargs):
        calls["n"] += 1
        lw = original(self, x, k, generator, **kwargs)
        if self.training and bad_calls(calls["n"]):
            lw = lw + torch.tensor(float("nan"))
        return lw

    monkeypatch.setattr(VAE, "log_weights", log_weights)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    _poison_log_weights(monkeypatch, lambda n: n in (3, 7, 8))
    train(small_config(stages=1), tmp_path / "run", dataset=synthetic(), progress=False)
    (m,) = read_metrics(tmp_path / "run")
    assert m["skipped_steps"] == 3 and np.isfinite(m["train_bound"])
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())


def test_a_non_finite_batch_is_skipped(tmp_path, monkeypatch):
    original, calls = iwae.steppers.train_step, {"n": 0}

    def poisoned(model, objective, optimizer, x, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            x = x.clone()
            x[0, 0] = float("nan")
        return original(model, objective, optimizer, x, *args, **kwargs)

    monkeypatch.setattr(iwae.steppers, "train_step", poisoned)
    train(small_config(stages=1), tmp_path / "run", dataset=synthetic(), progress=False)
    (m,) = read_metrics(tmp_path / "run")
    assert m["skipped_steps"] == 1 and np.isfinite(m["train_bound"])
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())


def test_training_data_must_be_grey_values(tmp_path):
    data = synthetic()
    bad = data.train.copy()
    bad[3, 5] = np.nan
    with pytest.raises(IwaeError, match=r"must be grey values in \[0, 1\]"):
        train(
            small_config(),
            tmp_path / "run",
            dataset=Dataset("mnist", bad, data.test),
            progress=False,
        )
    assert not (tmp_path / "run").exists()


def test_log_std_guard_is_inactive_at_normal_values():
    layer = GaussianLayer(3, (4,), 2)
    with torch.no_grad():
        layer.scale.bias.copy_(torch.tensor([0.5, 40.0]))
        layer.scale.weight.zero_()
    _, log_std = layer(torch.randn(5, 3))
    assert (
        torch.allclose(log_std[:, 0], torch.full((5,), 0.5))
        and (log_std[:, 1] == LOG_STD_LIMIT).all()
    )


def test_persistent_non_finite_steps_stop_training(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _poison_log_weights(
        monkeypatch, lambda n: n > 50
    )  # pass 1 (20 steps) and 2 are fine, then all bad
    with pytest.raises(IwaeError, match="5 consecutive steps"):
        # stage_nll_k=0: the stage-end test NLL would call log_weights too and move the count
        train(
            small_config(stages=3, max_bad_steps=5, stage_nll_k=0),
            run,
            dataset=synthetic(),
            progress=False,
        )
    monkeypatch.undo()
    assert [m["pass"] for m in read_metrics(run)] == [
        1,
        2,
    ]  # checkpointed after pass 1 (stage 1's end)
    resume(run, dataset=synthetic(), progress=False)  # the last good checkpoint is intact
    assert [m["pass"] for m in read_metrics(run)] == list(range(1, 14))


# -- configuration files and CLI options ---------------------------------------------------


@pytest.mark.parametrize(
    "name, text",
    [
        (
            "c.toml",
            'dataset = "omniglot"\nobjective = "miwae"\nk = 4\nm = 2\nstages = 2\nseed = 7\n',
        ),
        ("c.yaml", "dataset: omniglot\nobjective: miwae\nk: 4\nm: 2\nstages: 2\nseed: 7\n"),
        (
            "c.json",
            '{"dataset": "omniglot", "objective": "miwae", "k": 4, "m": 2, "stages": 2, "seed": 7}',
        ),
    ],
)
def test_config_files(tmp_path, monkeypatch, name, text):
    seen = {}
    monkeypatch.setattr(
        "iwae.train.train",
        lambda config, out, **kw: (
            seen.update(config=config, out=out)
            or {
                "passes": 4,
                "train_seconds": 1.0,
                "final_train_bound": -1.0,
                "final_test_iwae64": -1.0,
                "test_iwae64_n": 1,
            }
        ),
    )
    (tmp_path / name).write_text(text)
    assert (
        main(["train", "--config", str(tmp_path / name), "-k", "8", "--out", str(tmp_path / "run")])
        == 0
    )
    config = seen["config"]
    assert (config.dataset, config.objective, config.k, config.m, config.stages, config.seed) == (
        "omniglot",
        "miwae",
        8,
        2,
        2,
        7,
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ('dataset = "mnist"\nkay = 3\n', "unknown configuration keys: kay"),
        ('k = "five"\n', "k must be of type int"),
        ("k = 0\n", "k must be an integer >= 1"),
        ('objective = "iwae"\nm = 2\n', "-m (groups) applies"),
        ("k = [\n", "not valid TOML"),
        ("stages = 12\n", "stages must be between 1 and 8"),
    ],
)
def test_bad_config_files(tmp_path, capsys, text, message):
    (tmp_path / "c.toml").write_text(text)
    code = main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_resume_cli_errors(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "-k", "5"]) == 2
    assert "--resume takes the run's own configuration" in capsys.readouterr().err


# -- data parallel --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective", [["piwae", "-m", "2", "-k", "3"], ["iwae", "-k", "5", "--estimator", "dreg"]]
)
def test_torchrun_two_processes_match_one(shared_data_dir, tmp_path, objective):
    """torchrun --nproc_per_node 2 (gloo) gives the single-process run with the same global
    batch."""
    args = [
        "train",
        "--objective",
        *objective,
        "--epochs",
        "2",
        "--n-train",
        "310",
        "--eval-n",
        "50",
        "--precision",
        "fp32",  # auto is fp32 under torchrun, and may be bf16 in one process
        "--data-dir",
        str(shared_data_dir),
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "iwae.cli", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "iwae.cli",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:  # the same up to the order of floating-point sums
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=0), (
            key,
            (a[key] - b[key]).abs().max(),
        )
    ma, mb = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["train_bound"] for m in ma] == pytest.approx([m["train_bound"] for m in mb], abs=1e-3)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2


@pytest.mark.parametrize(
    "command", [["evaluate"], ["sample", "--out", "grid.png"], ["train", "--resume"]]
)
def test_bad_run_directories_on_the_command_line(
    finished_run, tmp_path, capsys, command, monkeypatch
):
    """An empty directory, or one whose weights are cut short: one line, exit code 2."""
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    weights_file = finished_run / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    (finished_run / CHECKPOINT_FILE).write_bytes(b"")
    for run_dir, what in ((empty, "config.json"), (finished_run, "safetensors")):
        argv = (
            [command[0], *command[1:], str(run_dir)]
            if command[0] == "train"
            else [command[0], str(run_dir), *command[1:]]
        )
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err, err
    assert not (tmp_path / "grid.png").exists()


def test_flushing_denormals_leaves_the_printed_results_unchanged(shared_data_dir, tmp_path):
    """Denormals flushed (the default of every command) or not: the same bounds on a fixed
    seed, to the digits `iwae train` prints (real MNIST, two passes, stage-end NLL)."""
    config = TrainConfig(
        dataset="mnist",
        objective="iwae",
        k=5,
        epochs=2,
        n_train=2000,
        eval_n=200,
        eval_every=1,
        stage_nll_k=500,
        data_dir=str(shared_data_dir),
    )
    printed = {}
    try:
        for flush in (False, True):
            assert flush_denormals(flush)  # supported on the x86 CPUs CI runs on
            train(config, tmp_path / str(flush), progress=False)
            printed[flush] = [
                (f"{m['train_bound']:.2f}", f"{m['test_iwae64']:.2f}")
                for m in read_metrics(tmp_path / str(flush))
            ]
            printed[flush].append(
                f"{read_metrics(tmp_path / str(flush))[-1]['test_nll_subset']:.2f}"
            )
    finally:
        flush_denormals(False)  # torch's default
    assert printed[True] == printed[False]


FAULTS_PER_STEP = """
import ctypes, json, resource, torch
from iwae.bounds import Objective
from iwae.model import VAE, ModelConfig
from iwae.optim import adam, train_step
from iwae.precision import step_context
from iwae.train import reuse_freed_memory

# 4-KiB pages whatever the machine's transparent huge pages setting (PR_SET_THP_DISABLE = 41):
# a huge page faults 512 of them in at once.
assert ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0) == 0
torch.set_num_threads(1)
model, objective = VAE(ModelConfig()).train(), Objective("iwae", k=50)
optimizer, generator = adam(model.parameters()), torch.Generator().manual_seed(0)
x = torch.bernoulli(torch.full((20, 784), 0.3), generator=generator)


def faults_of_each_step(steps=30):
    counts = []
    with step_context(model, "bf16"):
        for _ in range(10):
            train_step(model, objective, optimizer, x, generator)
        for _ in range(steps):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            train_step(model, objective, optimizer, x, generator)
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts


default = faults_of_each_step()
print(json.dumps([default, reuse_freed_memory(), faults_of_each_step()]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_reusing_freed_memory_ends_the_page_faults_of_each_step():
    """With glibc's defaults a k=50 step (bf16, 1 thread) maps and faults in fresh pages for
    its tensors; after reuse_freed_memory() it reuses the freed ones (a fresh process: the
    setting is process-wide). Counted per step, in 4-KiB pages."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_STEP], capture_output=True, text=True, check=True
    ).stdout
    default, applied, reused = json.loads(out)
    assert applied is True
    # The [50, 20, 784] fp32 logits alone are 766 pages; most default steps fault 1,000-1,900,
    # some none (Intel Xeon with AMX, torch 2.13; AMD EPYC: 1,000-1,500 a step on average).
    assert max(default) >= 700, default
    assert statistics.median(reused) == 0, reused  # 0 or 1 a step on the Intel Xeon
    assert sum(reused) < sum(default) / 3, (default, reused)


def test_cpu_training_reuses_freed_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(iwae.engine, "reuse_freed_memory", lambda device: calls.append(device))
    train(small_config(stages=1), tmp_path / "run", dataset=synthetic(), progress=False)
    assert calls == [torch.device("cpu")]


def test_a_pass_clock_counts_its_shuffle_and_binarization(monkeypatch, tmp_path):
    """Each pass's ``seconds`` (and so ``train_seconds``) starts before the pass's batches
    are drawn: on 60,000 images that draw is a tenth of a k=1 pass on one thread."""
    drawn = iwae.engine.pass_batches

    def slow(run):
        time.sleep(0.5)
        return drawn(run)

    monkeypatch.setattr(iwae.engine, "pass_batches", slow)
    run = tmp_path / "run"
    train(small_config(stages=1), run, dataset=synthetic(), progress=False)
    records = [m for m in read_metrics(run) if "seconds" in m]
    assert records and all(m["seconds"] >= 0.5 for m in records), records
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_seconds"] >= 0.5 * len(records)


def test_train_step_skips_on_the_device_without_reading_the_host(monkeypatch):
    """The non-finite guard stays on the device: no .item()/bool() in a step (a host sync on
    a GPU), and a skipped step leaves the weights, Adam's moments and its step count as they
    were."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(x_dim=12, latent=(3,), hidden=((8,),)))
    optimizer = adam(model.parameters())
    assert optimizer.defaults["fused"]
    objective, g = Objective("iwae", k=4), torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((5, 12), 0.4), generator=g)

    def no_host_read(*args):
        raise AssertionError("a host read of a tensor inside train_step")

    train_step(model, objective, optimizer, x, g)  # Adam's state exists from here on
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_host_read)
        m.setattr(torch.Tensor, "__bool__", no_host_read)
        bad = x.clone()
        bad[0, 0] = float("nan")
        value, skipped = train_step(model, objective, optimizer, bad, g)
        assert skipped.shape == () and skipped.device == x.device
    assert skipped.item() == 1.0 and not torch.isfinite(value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for p, saved in zip(model.parameters(), moments):
        assert all(torch.equal(v, optimizer.state[p][k]) for k, v in saved.items())
    value, skipped = train_step(model, objective, optimizer, x, g)
    assert skipped.item() == 0.0 and torch.isfinite(value)
    assert not torch.equal(
        before["encoder.0.mean.weight"], model.state_dict()["encoder.0.mean.weight"]
    )
    assert all(optimizer.state[p]["step"].item() == 2 for p in model.parameters())


def test_a_checkpoint_from_another_device_kind_continues_with_a_reseeded_stream(tmp_path):
    """A run checkpointed on a GPU (a 16-byte CUDA generator state) continues on the CPU, and
    back: the random stream is re-seeded from the saved state, deterministically."""
    config = small_config(stages=2)
    train(config, tmp_path / "a", dataset=synthetic(), progress=False)
    path = tmp_path / "a" / CHECKPOINT_FILE
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    state = json.loads(metadata["state"])
    state["progress"].update(passes=1, step=0)  # back to the end of stage 1: 3 passes to go
    cuda_like = torch.arange(16, dtype=torch.uint8)  # what torch.cuda's generator saves
    tensors.update({"rng.generator": cuda_like, "rng.pass_start": cuda_like.clone()})
    for name in ("b", "c"):
        (tmp_path / name).mkdir()
        safetensors.torch.save_file(
            tensors, tmp_path / name / CHECKPOINT_FILE, metadata={"state": json.dumps(state)}
        )
        (tmp_path / name / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
        (tmp_path / name / "metrics.jsonl").write_text(
            (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0] + "\n"
        )
        resume(tmp_path / name, dataset=synthetic(), progress=False)
    assert [m["pass"] for m in read_metrics(tmp_path / "b")] == [1, 2, 3, 4]
    assert_bitwise_equal(weights(tmp_path / "b"), weights(tmp_path / "c"))  # deterministic
    assert not torch.equal(
        weights(tmp_path / "a")["encoder.0.mean.weight"],
        weights(tmp_path / "b")["encoder.0.mean.weight"],
    )
    g = torch.Generator()
    assert torch.equal(generator_state(g, g.get_state()), g.get_state())  # the same kind: unchanged
