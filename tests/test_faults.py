"""The faults a long run meets, each injected for real: a second writer (two processes), a
signal (SIGTERM, SIGINT), a failed write (ENOSPC from fsync in a child process), bytes
flipped in a checkpoint on disk, a killed worker of ``iwae reproduce``; and a grid of 200
runs (``slow``). In each, nothing is lost beyond the step in progress, and a continued run
ends with the weights of a run never interrupted, bit for bit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch

import iwae.engine
from iwae.checkpoint import CHECKPOINT_FILE, CHECKPOINT_PREV_FILE
from iwae.cli import main
from iwae.rundir import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_train import assert_bitwise_equal, synthetic, weights  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
#: children whose training steps each sleep 50 ms first (tests/slow_steps/sitecustomize.py):
#: a signal or a kill then lands mid-training; the numbers are unchanged
SLOW = {
    **ENV,
    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "slow_steps"), SRC]),
    "IWAE_TEST_STEP_SECONDS": "0.05",
}


def _npz(path: Path, n: int = 200) -> Path:
    """``synthetic()`` images (28x28 grey) as an .npz file for the CLI."""
    data = synthetic(n=n)
    np.savez(path, train=data.train.reshape(-1, 28, 28), test=data.test.reshape(-1, 28, 28))
    return path


def _train_argv(data: Path, out: Path, *more: str) -> list[str]:
    """``iwae train`` of a small model: 10 steps a pass (200 images, batch 20), 4 passes."""
    return [
        "train",
        "--dataset",
        str(data),
        "--latent",
        "4",
        "--hidden",
        "16",
        "-k",
        "3",
        "--stages",
        "2",
        "--eval-n",
        "20",
        "--stage-nll-k",
        "0",
        "--threads",
        "1",
        "--precision",
        "fp32",  # runs compared bit for bit: no timing decides
        "--quiet",
        "--out",
        str(out),
        *more,
    ]


def _position(path: Path) -> tuple[int, int]:
    with safetensors.safe_open(path, "pt") as f:
        progress = json.loads(f.metadata()["state"])["progress"]
    return progress["passes"], progress["step"]


def _without_seconds(run: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(run)]


def _assert_same_run(run: Path, reference: Path) -> None:
    assert_bitwise_equal(weights(run), weights(reference))
    assert _without_seconds(run) == _without_seconds(reference)


def _snapshot(directory: Path) -> dict:
    """Every file under ``directory`` with its bytes (to show that nothing was written), but
    the TensorBoard logs: the holder's own writer thread flushes them when it likes."""
    files = (p for p in sorted(directory.rglob("*")) if p.is_file() and "tb" not in p.parts)
    return {p: p.read_bytes() for p in files}


def _wait_for(
    predicate, proc: subprocess.Popen | None, seconds: float = 300, what: object = "timed out"
) -> None:
    """Until ``predicate()``, failing (with ``what``) after ``seconds`` or should ``proc``
    (if any) end first."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(data file, a run of :func:`_train_argv` never interrupted)."""
    d = tmp_path_factory.mktemp("reference")
    data = _npz(d / "d.npz")
    assert main(_train_argv(data, d / "run", "--checkpoint-minutes", "1e-9")) == 0
    return data, d / "run"


# -- one writer per directory ----------------------------------------------------------------

_BLOCKED_TRAINING = """
import os, sys, time
import iwae.engine
from iwae.cli import main
save = iwae.engine.save_checkpoint
def block(*args, **kwargs):  # the checkpoint after the first stage never comes: training
    if os.path.exists(os.path.join(sys.argv[1], "model.safetensors")):  # holds its lock
        open(sys.argv[1] + ".blocked", "w").close()
        time.sleep(600)
    save(*args, **kwargs)
iwae.engine.save_checkpoint = block
main(sys.argv[2:])
"""


def test_a_second_writer_stops_at_once_naming_the_holder(reference, tmp_path, capsys):
    """While `iwae train` (another process) holds a run directory, a second `train --out`,
    `train --resume`, `evaluate` and `bdmc` exit with 2 and one line naming the directory,
    the holder's PID and host, and since when, and write nothing; `sample` (a reader) works.
    Killed with SIGKILL, the holder leaves no stale lock: --resume then finishes the run."""
    data, ref = reference
    run = tmp_path / "run"
    argv = _train_argv(data, run, "--checkpoint-minutes", "1e-9")
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_TRAINING, str(run), *argv], env=ENV, text=True
    )
    try:
        _wait_for(Path(str(run) + ".blocked").exists, proc)
        before = _snapshot(run)
        capsys.readouterr()
        for second in (
            ["train", "--resume", str(run), "--quiet"],
            [*argv, "--overwrite"],
            ["evaluate", str(run), "-k", "2", "--quiet"],
            ["bdmc", str(run), "--n", "2", "--ais-steps", "2", "--quiet"],
        ):
            assert main(second) == 2, second
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert str(run) in err and f"PID {proc.pid} on {socket.gethostname()} since " in err
        assert _snapshot(run) == before
        assert main(["sample", str(run), "--out", str(tmp_path / "s.png"), "--n", "4"]) == 0
    finally:
        proc.kill()
        proc.wait()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_bitwise_equal(weights(run), weights(ref))


# -- SIGTERM and SIGINT ------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_step_in_progress(reference, tmp_path, signum):
    """`iwae train` sent a signal mid-training (twice, the second while it checkpoints)
    finishes the step in progress, checkpoints it, exits with 128 + the signal's number and
    one line saying where it stopped and how to go on; --resume then ends with the weights
    and metrics of a run never interrupted."""
    data, ref = reference
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "iwae.cli", *_train_argv(data, run)]
    proc = subprocess.Popen(argv, env=SLOW, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(read_metrics(run)) >= 1, proc)
    proc.send_signal(signum)
    time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    line = err.strip().splitlines()[-1]
    assert f"interrupted by {signal.Signals(signum).name}" in line and "--resume" in line
    passes, step = _position(run / CHECKPOINT_FILE)
    assert (passes, step) != (4, 0) and not (run / "summary.json").exists()
    where = f"pass {passes + 1}, step {step}" if step else f"the end of pass {passes}"
    assert where in line
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    _assert_same_run(run, ref)


# -- a write that fails ----------------------------------------------------------------------

_FULL_DISK = """
import errno, os, sys
from iwae.cli import main
target, after = sys.argv[1], int(sys.argv[2])
seen = []
real_fsync = os.fsync
def fsync(fd):  # the disk fills up: the write of `target`'s temporary file fails
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if target in name and name.endswith(".tmp"):
        seen.append(name)
        if len(seen) > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)
os.fsync = fsync
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
@pytest.mark.parametrize(
    "target, after",
    [("checkpoint.safetensors", 3), ("model.safetensors", 0)],
    ids=["checkpoint", "weights"],
)
def test_a_failed_write_keeps_the_last_checkpoint(reference, tmp_path, target, after):
    """The checkpoint (or weights) write fails with ENOSPC in a child process: training
    stops with exit code 2 and one line naming the file, the reason and the position of the
    last good checkpoint, which is intact; no temporary file is left; --resume then ends
    with the weights of a run never interrupted."""
    data, ref = reference
    run = tmp_path / "run"
    argv = _train_argv(data, run, "--checkpoint-minutes", "1e-9")
    r = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, target, str(after), *argv],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert f"cannot write {run / target}" in line and "No space left on device" in line
    passes, step = _position(run / CHECKPOINT_FILE)  # intact: its checksum is checked on resume
    where = f"pass {passes + 1}, step {step}" if step else f"the end of pass {passes}"
    assert f"the last good checkpoint, at {where}, is intact" in line
    assert (passes, step) == ((0, 3) if target == "checkpoint.safetensors" else (0, 9))
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    _assert_same_run(run, ref)


# -- a corrupt checkpoint ----------------------------------------------------------------------


def _cut(reference, tmp_path, monkeypatch) -> Path:
    """A copy of the reference run stopped by its time limit at pass 2, step 3, with a
    checkpoint at every step (the previous one at step 2)."""
    data, _ = reference
    run = tmp_path / "run"
    seen = []
    # 11 checks a pass (one a step, one at its end): the 14th is at pass 2, step 3
    monkeypatch.setattr(iwae.engine, "_time_up", lambda g: len(seen.append(1) or seen) >= 14)
    argv = _train_argv(data, run, "--checkpoint-minutes", "1e-9", "--time-limit", "60")
    assert main(argv) == 3
    monkeypatch.undo()
    assert _position(run / CHECKPOINT_FILE) == (1, 3)
    assert _position(run / CHECKPOINT_PREV_FILE) == (1, 2)
    return run


def _flip(path: Path, where: float = 0.75) -> None:
    """Flip the bits of 8 bytes of ``path``'s tensor data (the header stays readable)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i : i + 8] = bytes(b ^ 0xFF for b in data[i : i + 8])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(
    reference, tmp_path, monkeypatch, capsys, damage
):
    """Bytes flipped in the newest checkpoint's tensors (its checksum fails), or the file
    cut short: --resume says so in one line, continues from the previous checkpoint (one
    step earlier, replayed) and ends with the weights of a run never interrupted."""
    run = _cut(reference, tmp_path, monkeypatch)
    path = run / CHECKPOINT_FILE
    if damage == "flip":
        _flip(path)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resuming from the previous checkpoint" in err, err
    assert "pass 2, step 2" in err
    if damage == "flip":
        assert "does not match its SHA-256 checksum" in err
    _assert_same_run(run, reference[1])


def test_two_corrupt_checkpoints_are_an_error_that_changes_nothing(
    reference, tmp_path, monkeypatch, capsys
):
    run = _cut(reference, tmp_path, monkeypatch)
    _flip(run / CHECKPOINT_FILE)
    _flip(run / CHECKPOINT_PREV_FILE, 0.5)
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no valid checkpoint" in err
    assert str(run / CHECKPOINT_FILE) in err and str(run / CHECKPOINT_PREV_FILE) in err
    assert _snapshot(run) == before


def test_a_checkpoint_without_a_checksum_still_loads(reference, tmp_path, monkeypatch):
    """Checkpoints written before checksums (no ``sha256`` metadata) resume as before."""
    run = _cut(reference, tmp_path, monkeypatch)
    path = run / CHECKPOINT_FILE
    with safetensors.safe_open(path, "pt") as f:
        state = f.metadata()["state"]
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(tensors, path, metadata={"state": state})
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    _assert_same_run(run, reference[1])


# -- iwae reproduce: killed workers, signals ----------------------------------------------------

_REPRODUCE = """
import json, sys
from iwae.errors import Interrupted
from iwae.experiments import reproduce
if __name__ == "__main__":
    out, data, backend = sys.argv[1:4]
    try:
        results = reproduce(
            "table1", out, stages=2, workers=2, backend=backend, lockstep=False,
            data_dir=str(data), eval_k=4, n_test=10, progress=False,
            only={"dataset": "mnist", "layers": "1", "k": "1"},
            overrides={"dataset": data, "n_train": 200, "eval_n": 20, "stage_nll_k": 0,
                       "model": {"latent": [4], "hidden": [[16]]}, "checkpoint_minutes": 1e-9,
                       "precision": "fp32"},  # compared bit for bit: no timing decides
        )
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    print(json.dumps(results))
"""


def _reproduce(out: Path, data: Path, backend: str = "local", **kw) -> subprocess.Popen:
    env = {**SLOW, "RAY_ADDRESS": "local", "RAY_DISABLE_USAGE_STATS": "1"}
    argv = [sys.executable, "-c", _REPRODUCE, str(out), str(data), backend]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _statuses(out: Path) -> dict:
    return json.loads((out / "runner.json").read_text())["runs"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _training_worker(out: Path) -> tuple[Path, int] | None:
    """(run directory, PID of the worker training it) once a run has a checkpoint."""
    for d in sorted(out.glob("runs/*")):
        info = d / ".lock.json"
        if (d / CHECKPOINT_FILE).exists() and info.exists():
            try:
                return d, json.loads(info.read_text())["pid"]
            except (ValueError, OSError):
                pass
    return None


@pytest.fixture(scope="module")
def grid_reference(tmp_path_factory) -> tuple[Path, Path]:
    """(data file, the experiment of :data:`_REPRODUCE` never interrupted)."""
    d = tmp_path_factory.mktemp("grid")
    data = _npz(d / "d.npz")
    proc = _reproduce(d / "exp", data)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    return data, d / "exp"


def _assert_same_grid(out: Path, reference: Path) -> None:
    runs = sorted(p.name for p in reference.glob("runs/*"))
    assert sorted(p.name for p in out.glob("runs/*")) == runs and len(runs) == 2
    for name in runs:
        _assert_same_run(out / "runs" / name, reference / "runs" / name)


@pytest.mark.parametrize(
    "backend", ["local", pytest.param("ray", marks=pytest.mark.slow)], ids=["local", "ray"]
)
def test_a_killed_worker_is_retried_from_its_checkpoint(grid_reference, tmp_path, backend):
    """A worker process of `reproduce --workers 2` killed with SIGKILL while it trains: its
    run is trained again from its checkpoint (attempts 2 in runner.json), the other run
    finishes, and both end with the weights of runs never interrupted; no worker is left."""
    if backend == "ray":
        pytest.importorskip("ray", reason="the ray extra is not installed")
    data, ref = grid_reference
    out = tmp_path / "exp"
    proc = _reproduce(out, data, backend)
    found = []
    _wait_for(lambda: found.append(_training_worker(out)) or found[-1], proc, 600)
    killed, pid = found[-1]
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    statuses = _statuses(out)
    assert statuses[killed.name] == {"status": "done", "attempts": 2}
    assert all(s["status"] == "done" for s in statuses.values()) and len(statuses) == 2
    assert "retry 1 of 2 from its checkpoint" in err.decode()
    _assert_same_grid(out, ref)
    assert not _alive(pid)


def test_a_failing_task_is_retried_then_recorded_and_the_others_finish():
    """The loop alone: a task that keeps failing is called 1 + max_retries times, then its
    run is "failed after N retries: REASON"; the other task's run is done."""
    from iwae.experiments import Run
    from iwae.schedule import run_tasks

    class Executor:
        def __init__(self):
            self.calls = []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def submit(self, fn, task):
            self.calls.append(task[0].name)
            return len(self.calls) - 1

        def wait_any(self, handles):
            return handles[:1]

        def result(self, handle):
            name = self.calls[handle]
            if name == "bad":
                raise RuntimeError("worker process 1 died (killed by SIGKILL)")
            return [{"name": name, "status": "done"}]

    executor = Executor()
    tasks = [(Run("bad", {}),), (Run("good", {}),), (Run("next", {}, after="bad"),)]
    results = run_tasks(tasks, executor, None, False, max_retries=2)
    assert executor.calls.count("bad") == 3 and executor.calls.count("good") == 1
    status = {r["name"]: r["status"] for r in results}
    assert status["good"] == "done"
    assert status["bad"] == (
        "failed after 2 retries: RuntimeError: worker process 1 died (killed by SIGKILL)"
    )
    assert status["next"] == "failed: it continues bad, which failed"


@pytest.mark.parametrize(
    "backend", ["local", pytest.param("ray", marks=pytest.mark.slow)], ids=["local", "ray"]
)
def test_reproduce_passes_a_signal_on_and_continues_bit_for_bit(grid_reference, tmp_path, backend):
    """SIGTERM to `reproduce` while its workers train: each worker (Ray: each task, by
    ray.cancel) checkpoints its run at the step in progress, the runner exits with 143 and
    one line, runner.json says "interrupted", no worker is left; run again, the experiment
    ends as one never stopped."""
    if backend == "ray":
        pytest.importorskip("ray", reason="the ray extra is not installed")
    data, ref = grid_reference
    out = tmp_path / "exp"
    proc = _reproduce(out, data, backend)
    found = []
    _wait_for(lambda: found.append(_training_worker(out)) or found[-1], proc, 600)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err.decode()[-3000:]
    assert "interrupted by SIGTERM" in err.decode().strip().splitlines()[-1]
    assert "interrupted" in {s["status"] for s in _statuses(out).values()}
    assert not _alive(found[-1][1])
    again = _reproduce(out, data)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err.decode()[-3000:]
    assert {s["status"] for s in _statuses(out).values()} <= {"done", "skipped"}
    _assert_same_grid(out, ref)


# -- load ----------------------------------------------------------------------------------


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, each with its command line."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                cmdline = (stat.parent / "cmdline").read_bytes()
                found[int(stat.parent.name)] = cmdline.replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


_LOAD = """
import sys
from iwae.experiments import reproduce
if __name__ == "__main__":
    out, data = sys.argv[1:3]
    reproduce(
        "table1", out, stages=1, seeds=100, workers=2, lockstep=False, data_dir=data,
        eval_k=2, n_test=10, progress=False, only={"dataset": "mnist", "layers": "1", "k": "1"},
        overrides={"dataset": data, "n_train": 20, "eval_n": 10, "stage_nll_k": 0,
                   "model": {"latent": [2], "hidden": [[8]]}},
    )
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_a_grid_of_200_runs(tmp_path):
    """200 tiny runs (table1's VAE and IWAE k=1 at 100 seeds, 1 pass of 20 images) through
    `reproduce --workers 2`: all finish, the runner's memory stays flat (its RSS over the
    second half of the grid within 30 MiB of the first quarter's peak), no worker is left (the
    stdlib's resource tracker ends within 10 s of the runner), and the report reads all 200."""
    from iwae.report import write_report
    from iwae.report.results import load_experiment

    data = _npz(tmp_path / "d.npz", n=40)
    out = tmp_path / "exp"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOAD, str(out), str(data)], env=ENV, stderr=subprocess.PIPE
    )
    samples, children = [], {}
    while proc.poll() is None:
        done = len(list(out.glob("runs/*/evaluation.json")))
        samples.append((done, _rss_kib(proc.pid)))
        children |= _children(proc.pid)
        time.sleep(0.5)
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    statuses = _statuses(out)
    assert len(statuses) == 200 and {s["status"] for s in statuses.values()} == {"done"}
    # The workers were joined before the runner returned; the spawn context's resource
    # tracker (a stdlib helper, not a worker) ends on its own once the runner has gone.
    workers = [pid for pid, cmd in children.items() if "resource_tracker" not in cmd]
    trackers = [pid for pid in children if pid not in workers]
    assert workers and not [pid for pid in workers if _alive(pid)], children
    _wait_for(lambda: not any(_alive(pid) for pid in trackers), None, 10, children)
    rss = [(done, kib) for done, kib in samples if kib is not None]
    early = max(kib for done, kib in rss if done <= 50)
    late = max(kib for done, kib in rss if done >= 100)
    print(
        f"runner RSS: {early / 1024:.1f} MiB (first quarter), {late / 1024:.1f} MiB (second half)"
    )
    assert late - early < 30 * 1024
    _, runs = load_experiment(out)
    assert len(runs) == 200 and all(r.evaluation is not None for r in runs)
    assert write_report(out).exists()
