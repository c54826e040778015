"""The training step replayed from a CUDA graph (iwae.cudagraph).

On a CPU: the static buffers, the noise drawn ahead of each step, the warm-up that leaves
everything as it was, and whole runs through that path (``capture=False``) against the
eager step. On CUDA (``cuda`` marker, skipped without a GPU): the captured step against
the eager one, skipped non-finite steps inside the graph, and resuming across the two.
"""

import json
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import iwae.cudagraph as cg
import iwae.experiments
import iwae.lockstep
import iwae.runs
import iwae.train as train_module
from iwae.bounds import Objective
from iwae.checkpoint import CHECKPOINT_FILE
from iwae.cli import main
from iwae.cudagraph import GraphedStep, GraphedSteps, ReplayedNoise
from iwae.errors import IwaeError
from iwae.model import VAE, ModelConfig
from iwae.train import (
    LockstepStep,
    adam,
    learning_rate,
    read_metrics,
    resume,
    set_lr,
    train,
    train_lockstep,
    train_step,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_train import assert_bitwise_equal, small_config, synthetic, weights  # noqa: E402
from tiny import tiny_data, tiny_model  # noqa: E402

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _randn(generator):
    return lambda shape, dtype, device: torch.randn(
        shape, dtype=dtype, device=device, generator=generator
    )


def test_replayed_noise_serves_the_generators_draws_in_order():
    """After recording, each refill draws from the source exactly what eager calls of the
    same shapes draw, into the same tensors (addresses) every time; out of order fails."""
    g, eager = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise = ReplayedNoise(_randn(g))
    first = [noise((5, 2, 3), torch.float32, "cpu"), noise((5, 2, 1), torch.float32, "cpu")]
    assert all(
        torch.equal(b, torch.zeros_like(b)) for b in first
    )  # recording serves zeros, draws nothing
    noise.freeze()
    for _ in range(3):
        noise.refill()
        got = [noise((5, 2, 3), torch.float32, "cpu"), noise((5, 2, 1), torch.float32, "cpu")]
        want = [torch.randn((5, 2, 3), generator=eager), torch.randn((5, 2, 1), generator=eager)]
        assert all(a is b for a, b in zip(got, first))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(g.get_state(), eager.get_state())
    noise.rewind()
    with pytest.raises(RuntimeError, match="out of the recorded order"):
        noise((5, 2, 1), torch.float32, "cpu")


def _step_body(model, optimizer, k):
    objective = Objective("iwae", k=k)
    return lambda x, noise: train_step(model, objective, optimizer, x, noise=noise)


def test_warm_up_changes_nothing():
    """The warm-up steps (a batch of NaNs: skipped) leave the weights, Adam's moments and
    step count, and the generator exactly as they were, on a fresh and on a trained model."""
    model, x = tiny_model().float(), tiny_data(n=5).float()
    optimizer, g = adam(model.parameters()), torch.Generator().manual_seed(0)
    body = _step_body(model, optimizer, 4)
    for trained in (False, True):
        if trained:
            for _ in range(3):
                body(x, _randn(g))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        rng = g.get_state()
        GraphedStep(body, tuple(x.shape), "cpu", _randn(g), capture=False)
        assert_bitwise_equal(before, {n: p.detach() for n, p in model.named_parameters()})
        for p, state in optimizer.state.items():
            if id(p) in moments:
                assert all(torch.equal(state[k], moments[id(p)][k]) for k in state)
            else:  # a fresh Adam: state created at step 0, zero moments (the same as no state)
                assert (
                    state["step"].item() == 0
                    and not state["exp_avg"].any()
                    and not state["exp_avg_sq"].any()
                )
        assert torch.equal(g.get_state(), rng)


def test_graphed_steps_follow_the_eager_steps_bit_for_bit():
    """The buffered step (without capture, on the CPU) takes exactly the eager steps: the same
    bounds, weights and generator state after several steps, batches of two shapes."""
    runs = []
    for graphed in (False, True):
        model, x = tiny_model().float(), tiny_data(n=7, seed=2).float()
        optimizer, g = adam(model.parameters()), torch.Generator().manual_seed(1)
        body = _step_body(model, optimizer, 3)
        step = (
            GraphedSteps(body, "cpu", _randn(g), capture=False)
            if graphed
            else (lambda xb, body=body, g=g: body(xb, _randn(g)))
        )
        values = [step(xb)[0].item() for xb in (x, x, x[:3], x, x[:3])]
        runs.append(
            (values, {n: p.detach().clone() for n, p in model.named_parameters()}, g.get_state())
        )
    assert runs[0][0] == runs[1][0]
    assert_bitwise_equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][2], runs[1][2])


def test_capturable_adam_reads_its_learning_rate_tensor():
    """A capturable Adam holds its rate as a tensor that set_lr changes in place (the tensor a
    captured step reads); a plain one a float."""
    model = tiny_model().float()
    opt = adam(model.parameters(), lr=1e-3, capturable=True)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and opt.defaults["capturable"] and opt.defaults["fused"]
    set_lr(opt, 2.5e-4)
    assert opt.param_groups[0]["lr"] is lr and learning_rate(opt) == pytest.approx(2.5e-4, rel=1e-7)
    plain = adam(model.parameters(), lr=1e-3)
    set_lr(plain, 2.5e-4)
    assert plain.param_groups[0]["lr"] == 2.5e-4 and learning_rate(plain) == 2.5e-4


def _force_graphs(monkeypatch):
    """Runs on the CPU take the graphed path (buffers and replays, no capture)."""
    monkeypatch.setattr(iwae.runs, "use_cuda_graphs", lambda mode, dev, shard: mode == "auto")


def _relative_gap(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


def _train_both(tmp_path, data, configs, lockstep):
    for mode in ("auto", "off"):
        outs = [tmp_path / f"{mode}{i}" for i in range(len(configs))]
        if lockstep:
            summaries = train_lockstep(
                configs, outs, dataset=data, progress=False, cuda_graphs=mode
            )
        else:
            summaries = [
                train(c, o, dataset=data, progress=False, cuda_graphs=mode)
                for c, o in zip(configs, outs)
            ]
        assert [s["cuda_graphs"] for s in summaries] == [mode == "auto"] * len(configs)
    return [(tmp_path / f"auto{i}", tmp_path / f"off{i}") for i in range(len(configs))]


@pytest.mark.parametrize("lockstep", [False, True], ids=["single", "lockstep"])
def test_runs_through_the_graphed_path_are_the_eager_runs(tmp_path, monkeypatch, lockstep):
    """Whole runs (4 passes of 110 images: a smaller last batch; the rate changing by stage)
    through the graphed path, with the eager run's Adam, are the eager runs bit for bit:
    weights, metrics and the generator's state. The summary says which path ran."""
    _force_graphs(monkeypatch)

    def plain_adam(*args, capturable=False, **kwargs):
        return adam(*args, **kwargs)

    # each run's optimizer (iwae.runs) and a lockstep group's stacked one (iwae.lockstep)
    monkeypatch.setattr(iwae.runs, "adam", plain_adam)
    monkeypatch.setattr(iwae.lockstep, "adam", plain_adam)
    configs = [small_config(stages=2, k=4, seed=s) for s in (0, 1)]
    for graphed, eager in _train_both(tmp_path, synthetic(n=110), configs, lockstep):
        assert_bitwise_equal(weights(graphed), weights(eager))
        strip = [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(graphed)]
        assert strip == [
            {k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(eager)
        ]
        rng = [
            safetensors.torch.load_file(d / CHECKPOINT_FILE)["rng.generator"]
            for d in (graphed, eager)
        ]
        assert torch.equal(*rng)


@pytest.mark.parametrize("lockstep", [False, True], ids=["single", "lockstep"])
def test_runs_with_the_capturable_adam_follow_eager_runs(tmp_path, monkeypatch, lockstep):
    """With the capturable Adam a graph needs (its rate a float32 tensor, the eager Adam's a
    float64 number) the same runs draw the same random numbers and end within 1e-4 (relative)
    of the eager runs' weights, the tolerance of lockstep training over 100 steps."""
    _force_graphs(monkeypatch)
    configs = [small_config(stages=2, k=4, seed=s) for s in (0, 1)]
    for graphed, eager in _train_both(tmp_path, synthetic(n=110), configs, lockstep):
        assert _relative_gap(weights(graphed), weights(eager)) < 1e-4
        rng = [
            safetensors.torch.load_file(d / CHECKPOINT_FILE)["rng.generator"]
            for d in (graphed, eager)
        ]
        assert torch.equal(*rng)
        assert [m["lr"] for m in read_metrics(graphed)] == [m["lr"] for m in read_metrics(eager)]


def test_a_graphed_run_resumes_eagerly(tmp_path, monkeypatch):
    """A checkpoint written by the graphed path continues on the eager path (and back) with the
    same random stream: stop after the first stage's checkpoint, resume with the other path."""
    data = synthetic(n=110)
    config = small_config(stages=2, k=4)
    _force_graphs(monkeypatch)
    train(config, tmp_path / "whole", dataset=data, progress=False, cuda_graphs="off")
    for first, then in (("auto", "off"), ("off", "auto")):
        out = tmp_path / f"{first}-{then}"
        short = small_config(stages=1, k=4)
        train(short, out, dataset=data, progress=False, cuda_graphs=first)
        (out / "summary.json").unlink()
        (out / "config.json").write_text((tmp_path / "whole" / "config.json").read_text())
        resume(out, dataset=data, progress=False, cuda_graphs=then)
        assert _relative_gap(weights(out), weights(tmp_path / "whole")) < 1e-4
        rng = [
            safetensors.torch.load_file(d / CHECKPOINT_FILE)["rng.generator"]
            for d in (out, tmp_path / "whole")
        ]
        assert torch.equal(*rng)


class _HostTraffic:
    """Records the operations that, on a GPU, copy Python data to the device (``lift_fresh``:
    a tensor built from a list or number, e.g. a list index) or wait for the device to read
    a value back (``_local_scalar_dense``: ``.item()``, ``bool()``)."""

    OPS = ("aten.lift_fresh", "aten._local_scalar_dense")

    def __enter__(self):
        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func).startswith(_HostTraffic.OPS):
                    seen.append(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize(
    "objectives", [("iwae", "vae", "iwae"), ("dreg", "stl"), ("piwae", "miwae")]
)
def test_training_steps_send_nothing_between_host_and_device(objectives):
    """A step that a CUDA graph can hold, and that never waits for the device: the single and
    the lockstep step (mixed objectives, both gradient routes) build no tensor from Python
    data and read no value back. Found on an H100: a list index in the lockstep bound
    reduction copied to the device in every step, so capture failed and every step waited."""

    def objective(name):
        if name in ("dreg", "stl"):
            return Objective("iwae", k=4, estimator=name)
        return Objective(name, m=2, k=2) if name in ("piwae", "miwae") else Objective(name, k=4)

    torch.manual_seed(0)
    config = ModelConfig(x_dim=30, latent=(4, 3), hidden=((16,), (8,)))
    members = [VAE(config) for _ in objectives]
    x = torch.bernoulli(
        torch.full((len(objectives), 5, 30), 0.3), generator=torch.Generator().manual_seed(1)
    )
    group = LockstepStep(
        members,
        [objective(o) for o in objectives],
        [torch.Generator().manual_seed(g) for g in range(len(objectives))],
        graphs=False,
    )
    single, single_opt, g = (
        members[0],
        adam(members[0].parameters()),
        torch.Generator().manual_seed(0),
    )
    with _HostTraffic() as traffic:
        for _ in range(2):
            group.step(x)
            train_step(single, objective(objectives[0]), single_opt, x[0], noise=_randn(g))
    assert traffic.seen == []
    with _HostTraffic() as traffic:  # the check sees what it looks for
        x[[0, 1]].sum().item()
    assert traffic.seen == ["aten.lift_fresh.default", "aten._local_scalar_dense.default"]


@pytest.mark.parametrize("lockstep", [False, True], ids=["single", "lockstep"])
def test_a_failed_capture_is_reported_in_the_summary(tmp_path, monkeypatch, lockstep):
    """Where capture fails the run still finishes (eagerly), and ``summary.json`` says so:
    ``cuda_graphs`` false and ``cuda_graph_failure`` the reason, not the path asked for."""

    def refuse(*args, **kwargs):
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")

    _force_graphs(monkeypatch)
    monkeypatch.setattr(cg, "GraphedStep", refuse)
    configs = [small_config(stages=1, k=4, seed=s) for s in (0, 1)]
    outs = [tmp_path / f"r{i}" for i in range(2)]
    with pytest.warns(UserWarning, match="capture failed"):
        if lockstep:
            summaries = train_lockstep(configs, outs, dataset=synthetic(n=50), progress=False)
        else:
            summaries = [
                train(c, o, dataset=synthetic(n=50), progress=False) for c, o in zip(configs, outs)
            ]
    for summary, out in zip(summaries, outs):
        assert summary["cuda_graphs"] is False
        assert "Cannot copy between CPU and CUDA" in summary["cuda_graph_failure"]
        assert summary == json.loads((out / "summary.json").read_text())


def test_cuda_graphs_flag_is_checked():
    with pytest.raises(IwaeError, match="--cuda-graphs"):
        train_module.use_cuda_graphs("on", torch.device("cpu"), None)
    assert not train_module.use_cuda_graphs("auto", torch.device("cpu"), None)
    assert not train_module.use_cuda_graphs("off", torch.device("cuda"), None)
    assert train_module.use_cuda_graphs("auto", torch.device("cuda"), None)
    assert not train_module.use_cuda_graphs("auto", torch.device("cuda"), (0, 2))


def test_cli_passes_cuda_graphs_on(monkeypatch, tmp_path):
    """``iwae train`` (new and --resume) and ``iwae reproduce`` hand --cuda-graphs to training
    (default auto); it is not a training option, so config.json does not record it."""
    seen = []
    monkeypatch.setattr(
        train_module,
        "train",
        lambda config, out, **kw: seen.append(("train", kw)) or {"final_test_iwae64": None},
    )
    monkeypatch.setattr(
        train_module,
        "resume",
        lambda run, **kw: seen.append(("resume", kw)) or {"final_test_iwae64": None},
    )
    monkeypatch.setattr(train_module, "load_config", lambda run: small_config())
    monkeypatch.setattr(
        iwae.experiments, "reproduce", lambda *a, **kw: seen.append(("reproduce", kw)) or []
    )
    assert (
        main(
            [
                "train",
                "--out",
                str(tmp_path / "a"),
                "--epochs",
                "1",
                "--cuda-graphs",
                "off",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["train", "--out", str(tmp_path / "b"), "--epochs", "1", "--quiet"]) == 0
    assert main(["train", "--resume", str(tmp_path), "--cuda-graphs", "off", "--quiet"]) == 0
    assert main(["reproduce", "table1", "--out", str(tmp_path / "r"), "--cuda-graphs", "off"]) == 0
    assert main(["reproduce", "table1", "--out", str(tmp_path / "r")]) == 0
    assert [(what, kw["cuda_graphs"]) for what, kw in seen] == [
        ("train", "off"),
        ("train", "auto"),
        ("resume", "off"),
        ("reproduce", "off"),
        ("reproduce", "auto"),
    ]


# -- on a GPU -----------------------------------------------------------------------------


@cuda
@needs_gpu
@pytest.mark.filterwarnings("error:CUDA graph capture failed")
@pytest.mark.parametrize("lockstep", [False, True], ids=["single", "lockstep"])
def test_captured_runs_match_eager_runs_on_cuda(tmp_path, lockstep):
    """On CUDA, runs whose steps are replayed from captured graphs follow the eager runs: the
    same random stream, weights within 1e-4 after 4 passes, summaries saying which ran."""
    data = synthetic(n=110)
    configs = [small_config(stages=2, k=4, seed=s) for s in (0, 1)]
    for mode in ("auto", "off"):
        outs = [tmp_path / f"{mode}{i}" for i in range(2)]
        if lockstep:
            summaries = train_lockstep(
                configs, outs, dataset=data, progress=False, device="cuda", cuda_graphs=mode
            )
        else:
            summaries = [
                train(c, o, dataset=data, progress=False, device="cuda", cuda_graphs=mode)
                for c, o in zip(configs, outs)
            ]
        assert [s["cuda_graphs"] for s in summaries] == [mode == "auto"] * 2
        assert all(s["device"].startswith("cuda") for s in summaries)
    for i in range(2):
        graphed, eager = tmp_path / f"auto{i}", tmp_path / f"off{i}"
        assert _relative_gap(weights(graphed), weights(eager)) < 1e-4
        rng = [
            safetensors.torch.load_file(d / CHECKPOINT_FILE)["rng.generator"]
            for d in (graphed, eager)
        ]
        assert torch.equal(*rng)


@cuda
@needs_gpu
def test_captured_step_skips_non_finite_steps_on_cuda():
    """A replayed step on a batch holding NaN is skipped on the device (weights, moments and
    step count unchanged) and reported; the next good batch steps."""
    model = tiny_model().float().cuda()
    x = tiny_data(n=5).float().cuda()
    optimizer, g = (
        adam(model.parameters(), capturable=True),
        torch.Generator(device="cuda").manual_seed(0),
    )
    steps = GraphedSteps(_step_body(model, optimizer, 4), "cuda", _randn(g), capture=True)
    steps(x)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step_count = [s["step"].clone() for s in optimizer.state.values()]
    bad = x.clone()
    bad[0, 0] = float("nan")
    value, skipped = steps(bad)
    assert skipped.item() == 1.0
    assert_bitwise_equal(before, {n: p.detach() for n, p in model.named_parameters()})
    assert all(torch.equal(a, s["step"]) for a, s in zip(step_count, optimizer.state.values()))
    value, skipped = steps(x)
    assert skipped.item() == 0.0 and torch.isfinite(value)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_failed_capture_falls_back_to_eager_steps(monkeypatch):
    """Where capturing raises, the steps run eagerly (with a warning), from the same state and
    the same random stream: the results are the eager steps' bit for bit."""

    def refuse(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cg.GraphedStep, "_capture", refuse)
    runs = []
    for fallback in (False, True):
        model, x = tiny_model().float(), tiny_data(n=7, seed=2).float()
        optimizer, g = adam(model.parameters()), torch.Generator().manual_seed(1)
        body = _step_body(model, optimizer, 3)
        if fallback:
            step = GraphedSteps(body, "cpu", _randn(g), capture=True)
        else:

            def step(xb, body=body, g=g):
                return body(xb, _randn(g))

        if fallback:
            with pytest.warns(UserWarning, match="capture failed"):
                step(x)
        else:
            step(x)
        values = [step(xb)[0].item() for xb in (x, x[:3], x)]
        runs.append(
            (values, {n: p.detach().clone() for n, p in model.named_parameters()}, g.get_state())
        )
    assert runs[0][0] == runs[1][0]
    assert_bitwise_equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][2], runs[1][2])
