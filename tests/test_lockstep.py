"""Lockstep training: runs trained side by side in one process follow their single runs,
write single-run directories, resume bit for bit after SIGKILL; the runner's grouping."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from iwae.bounds import Objective, backward_stacked
from iwae.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_NEXT_FILE,
    Progress,
    checkpoint_meta,
    save_checkpoint,
)
from iwae.errors import IwaeError
from iwae.experiments import grid, plan_tasks, reproduce
from iwae.model import VAE, ModelConfig
from iwae.train import (
    StackedNoise,
    adam,
    read_metrics,
    settle_group_checkpoint,
    train,
    train_lockstep,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_train import small_config, synthetic, weights  # noqa: E402

# one group: the same samples per example (4) and estimator family, four objectives and
# both gradient routes (PIWAE "split"), each its own seed
MIXED = [
    dict(objective="iwae", k=4, seed=0),
    dict(objective="vae", k=4, seed=1),
    dict(objective="piwae", m=2, k=2, seed=2),
    dict(objective="miwae", m=2, k=2, seed=3),
]
# q's parameters stopped inside log q: DReG and STL together
STOPPED = [
    dict(objective="iwae", k=4, estimator="dreg", seed=4),
    dict(objective="vae", k=4, estimator="stl", seed=5),
]


def _relative_gap(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


@pytest.mark.parametrize("members", [MIXED, STOPPED], ids=["mixed-objectives", "dreg-stl"])
def test_members_follow_their_single_runs(tmp_path, members):
    """Over the first 100 steps (5 passes of 20) every member stays within 1e-4 (relative) of
    the single run with its seed, draws exactly what that run draws (the generator ends in
    the same state), and writes the same files and metrics."""
    configs = [small_config(epochs=5, **m) for m in members]
    torch.set_num_threads(1)
    train_lockstep(
        configs,
        [tmp_path / f"group{i}" for i in range(len(configs))],
        dataset=synthetic(),
        progress=False,
    )
    for i, config in enumerate(configs):
        train(config, tmp_path / f"single{i}", dataset=synthetic(), progress=False)
        group, single = tmp_path / f"group{i}", tmp_path / f"single{i}"
        assert _relative_gap(weights(group), weights(single)) < 1e-4, members[i]
        assert {p.name for p in group.iterdir()} == {p.name for p in single.iterdir()}
        assert json.loads((group / "config.json").read_text()) == json.loads(
            (single / "config.json").read_text()
        )
        mg, ms = read_metrics(group), read_metrics(single)
        assert [m.keys() for m in mg] == [m.keys() for m in ms]
        assert all(abs(a["train_bound"] - b["train_bound"]) < 1e-3 for a, b in zip(mg, ms))
        rng = [
            safetensors.torch.load_file(d / CHECKPOINT_FILE)["rng.generator"]
            for d in (group, single)
        ]
        assert torch.equal(
            *rng
        )  # the same draws of data, binarization and noise, in the same order


def test_lockstep_needs_compatible_runs(tmp_path):
    with pytest.raises(IwaeError, match="must share"):
        train_lockstep(
            [small_config(k=4), small_config(k=5)],
            [tmp_path / "a", tmp_path / "b"],
            dataset=synthetic(),
        )
    with pytest.raises(IwaeError, match="must share"):
        train_lockstep(
            [small_config(k=4), small_config(k=4, estimator="dreg")],
            [tmp_path / "a", tmp_path / "b"],
            dataset=synthetic(),
        )
    assert not (tmp_path / "a").exists()


CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import small_config, synthetic
from iwae.train import train_lockstep
torch.set_num_threads(1)
configs = [
    small_config(stages=3, checkpoint_minutes=0.001, seed=s, objective=o)
    for s, o in ((0, "iwae"), (1, "vae"))
]
train_lockstep(configs, [{a!r}, {b!r}], dataset=synthetic(), progress=False, resume={resume})
"""


def test_killed_group_resumes_bit_for_bit(tmp_path):
    """A group killed with SIGKILL after its first checkpoint, then resumed, ends with the
    same weights and metrics, bit for bit, as a group never interrupted."""
    torch.set_num_threads(1)
    configs = [
        small_config(stages=3, checkpoint_minutes=0.001, seed=s, objective=o)
        for s, o in ((0, "iwae"), (1, "vae"))
    ]
    whole = [tmp_path / "whole0", tmp_path / "whole1"]
    train_lockstep(configs, whole, dataset=synthetic(), progress=False)

    killed = [tmp_path / "killed0", tmp_path / "killed1"]
    script = CHILD.format(
        tests=str(Path(__file__).parent), a=str(killed[0]), b=str(killed[1]), resume=False
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while (
        not (killed[1] / CHECKPOINT_FILE).exists()
        and time.monotonic() < deadline
        and child.poll() is None
    ):
        time.sleep(0.01)
    time.sleep(0.3)  # somewhere after the first checkpoint
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL  # killed, not finished
    assert not all((d / "summary.json").exists() for d in killed)
    assert any(len(read_metrics(d)) < 13 for d in killed)

    train_lockstep(configs, killed, dataset=synthetic(), progress=False, resume=True)
    for a, b in zip(whole, killed):
        wa, wb = weights(a), weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        strip = [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(a)]
        assert strip == [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(b)]


def _checkpoint_at(d: Path, name: str, passes: int, group: list[str]) -> None:
    model = VAE(ModelConfig(x_dim=4, latent=(2,), hidden=((3,),)))
    d.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        d / name,
        model,
        adam(model.parameters()),
        torch.Generator(),
        torch.Generator().get_state(),
        Progress(passes=passes),
        group,
    )


def _passes(d: Path) -> int:
    return checkpoint_meta(d / CHECKPOINT_FILE)["progress"]["passes"]


def test_an_interrupted_group_checkpoint_is_undone_or_finished(tmp_path):
    group = ["../a", "../b", "../c"]
    dirs = [tmp_path / n for n in "abc"]
    # killed while writing the next checkpoints (c has none yet): every run keeps pass 1
    for d in dirs:
        _checkpoint_at(d, CHECKPOINT_FILE, 1, group)
    for d in dirs[:2]:
        _checkpoint_at(d, CHECKPOINT_NEXT_FILE, 2, group)
    settle_group_checkpoint(dirs[0])
    assert [_passes(d) for d in dirs] == [1, 1, 1] and not any(
        (d / CHECKPOINT_NEXT_FILE).exists() for d in dirs
    )
    # killed while putting them in place (a is done): b and c are finished, all at pass 2
    _checkpoint_at(dirs[0], CHECKPOINT_FILE, 2, group)
    for d in dirs[1:]:
        _checkpoint_at(d, CHECKPOINT_NEXT_FILE, 2, group)
    settle_group_checkpoint(dirs[2])
    assert [_passes(d) for d in dirs] == [2, 2, 2] and not any(
        (d / CHECKPOINT_NEXT_FILE).exists() for d in dirs
    )


def test_runner_groups_compatible_runs_only(tmp_path):
    """On the CPU: VAE and IWAE of one k (<= 5 at batch 20) share a group; k=50, runs that
    continue another run, finished runs and --no-lockstep stay single."""
    runs = [r for r in grid("table1", stages=1) if r.label["dataset"] == "mnist"]
    tasks = plan_tasks(runs, tmp_path, None, group_size=8)
    groups = sorted(tuple(r.name for r in t) for t in tasks if len(t) > 1)
    assert groups == [
        (f"mnist-l{l}-vae-k{k}-s0", f"mnist-l{l}-iwae-k{k}-s0") for l in (1, 2) for k in (1, 5)
    ]
    assert sorted(t[0].name for t in tasks if len(t) == 1) == sorted(
        f"mnist-l{l}-{o}-k50-s0" for l in (1, 2) for o in ("vae", "iwae")
    )
    assert all(len(t) == 1 for t in plan_tasks(runs, tmp_path, None, group_size=1))
    two = grid("two-stage", stages=2, seeds=2)
    assert all(
        len(t) == 1 for t in plan_tasks([r for r in two if r.after], tmp_path, None, group_size=8)
    )
    four = [
        r
        for r in grid("table1", stages=1, seeds=4)
        if (r.label["dataset"], r.label["layers"], r.label["k"]) == ("mnist", 1, 1)
    ]
    sizes = sorted(len(t) for t in plan_tasks(four, tmp_path, None, group_size=3))
    assert sizes == [2, 3, 3]  # 8 runs of one key, in groups of at most 3
    assert sorted(len(t) for t in plan_tasks(four, tmp_path, None, group_size=8, workers=2)) == [
        4,
        4,
    ]  # no idle worker
    (tmp_path / "runs" / four[0].name).mkdir(parents=True)
    (tmp_path / "runs" / four[0].name / "summary.json").write_text(
        "{}"
    )  # trained: only evaluated, alone
    assert (four[0],) in plan_tasks(four, tmp_path, None, group_size=8)


def test_reproduce_in_lockstep_writes_what_single_runs_write(shared_data_dir, tmp_path):
    tiny = dict(n_train=300, eval_n=50, stage_nll_k=100, precision="fp32")  # compared: fp32
    kwargs = dict(
        stages=1,
        only={"dataset": "mnist", "layers": "1", "k": "5"},
        data_dir=str(shared_data_dir),
        overrides=tiny,
        eval_k=8,
        n_test=10,
        progress=False,
        threads=1,
    )
    reproduce("table1", tmp_path / "lockstep", **kwargs)
    reproduce("table1", tmp_path / "single", lockstep=False, **kwargs)
    for name in ("mnist-l1-vae-k5-s0", "mnist-l1-iwae-k5-s0"):
        a, b = tmp_path / "lockstep" / "runs" / name, tmp_path / "single" / "runs" / name
        assert {p.name for p in a.iterdir()} == {p.name for p in b.iterdir()}
        assert json.loads((a / "runner.json").read_text())["lockstep"] == [
            "mnist-l1-vae-k5-s0",
            "mnist-l1-iwae-k5-s0",
        ]
        assert "lockstep" not in json.loads((b / "runner.json").read_text())
        assert _relative_gap(weights(a), weights(b)) < 1e-4
        ea, eb = (json.loads((d / "evaluation.json").read_text()) for d in (a, b))
        assert abs(ea["nll"] - eb["nll"]) < 1e-2 and ea["n_test"] == eb["n_test"] == 10
    assert os.path.exists(tmp_path / "lockstep" / "experiment.json")


@pytest.mark.parametrize("layers", [1, 2])
def test_a_stacked_vae_computes_what_each_model_computes(layers):
    """VAE.stack: model g's log-weights (samples from its own generator) and gradients equal
    those of the single model it was made from; member_state gives its weights back."""
    torch.manual_seed(0)
    config = ModelConfig(x_dim=30, latent=(4, 3)[:layers], hidden=((16,), (8,))[:layers])
    members = [VAE(config) for _ in range(3)]
    stacked = VAE.stack(members)
    assert all(
        torch.equal(stacked.member_state(g)[n], v)
        for g, m in enumerate(members)
        for n, v in m.state_dict().items()
    )
    x = torch.bernoulli(torch.full((3, 5, 30), 0.3), generator=torch.Generator().manual_seed(1))
    objectives = [Objective("iwae", k=12), Objective("vae", k=12), Objective("piwae", m=3, k=4)]
    noise = StackedNoise([torch.Generator().manual_seed(g) for g in range(3)])
    log_w = stacked.log_weights(x, 12, noise=noise)  # 12 samples: the many-sample likelihood path
    assert log_w.shape == (3, 12, 5)
    backward_stacked(objectives, log_w, stacked.encoder_parameters(), stacked.decoder_parameters())
    for g, (m, o) in enumerate(zip(members, objectives)):
        single = m.log_weights(x[g], 12, torch.Generator().manual_seed(g))
        assert torch.allclose(log_w[g], single, atol=1e-5, rtol=1e-6)
        o.backward(single, m.encoder_parameters(), m.decoder_parameters())
        for (name, p), q in zip(stacked.named_parameters(), m.parameters()):
            assert torch.allclose(
                stacked.member_layout(name, p.grad, g), q.grad, atol=1e-5, rtol=1e-4
            ), name
