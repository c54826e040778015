"""``--precision {auto,fp32,bf16}``: bf16 runs train with the networks under bfloat16 autocast
and everything else in float32, resume bit for bit, are evaluated in float32; ``auto``
decides by a measurement once, when a run starts, and records it; fp32 steps are the
plain float32 steps."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import iwae.engine
import iwae.experiments
import iwae.precision as precision
from iwae import fit
from iwae.bounds import Objective
from iwae.cli import main
from iwae.config import TrainConfig, load_config
from iwae.errors import IwaeError, TimeLimitReached
from iwae.evaluate import evaluate
from iwae.lockstep import lockstep_key
from iwae.model import VAE, ModelConfig
from iwae.optim import adam, train_step
from iwae.train import load_run, read_metrics, resume, train, train_lockstep

sys.path.insert(0, str(Path(__file__).parent))
from test_time_limit import _limit_after  # noqa: E402
from test_train import assert_bitwise_equal, small_config, synthetic, weights  # noqa: E402

#: aten ops that reduce or take log-densities: never in bf16
REDUCTIONS = {"sum", "mean", "logsumexp", "amax", "max", "softplus", "exp", "log", "_softmax"}


class DtypeLog(TorchDispatchMode):
    """Records (aten op name, dtypes of its tensor arguments) of every op run under it."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, set]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [*args, *(kwargs or {}).values()]
        flat += [t for a in args if isinstance(a, (list, tuple)) for t in a]
        dtypes = {a.dtype for a in flat if isinstance(a, torch.Tensor)}
        self.calls.append((func.overloadpacket.__name__, dtypes))
        return func(*args, **(kwargs or {}))

    def ops_in(self, dtype) -> set[str]:
        return {name for name, dtypes in self.calls if dtype in dtypes}


def _no_timing(*args):
    raise AssertionError("step times measured where they should not be")


def _config(**kw) -> TrainConfig:
    return small_config(stages=2, k=4, **kw)


def test_a_bf16_run_trains_and_records_its_precision(tmp_path):
    """A bf16 run trains (finite bounds close to the fp32 run's, other weights) and records
    precision bf16 in config.json and summary.json."""
    data = synthetic(n=110)
    runs = {p: tmp_path / p for p in ("fp32", "bf16")}
    summaries = {
        p: train(_config(precision=p), out, dataset=data, progress=False) for p, out in runs.items()
    }
    for p, out in runs.items():
        config = json.loads((out / "config.json").read_text())
        assert (config["precision"], config["precision_requested"]) == (p, None)
        assert (summaries[p]["precision"], summaries[p]["precision_requested"]) == (p, p)
        assert "precision_measured" not in summaries[p]
        assert np.isfinite(summaries[p]["final_test_iwae64"])
    w16, w32 = weights(runs["bf16"]), weights(runs["fp32"])
    assert all(w.dtype == torch.float32 for w in w16.values())
    assert any(not torch.equal(w16[k], w32[k]) for k in w32)  # bf16 networks did compute
    gap = summaries["bf16"]["final_test_iwae64"] - summaries["fp32"]["final_test_iwae64"]
    assert abs(gap) < 1.0


@pytest.mark.parametrize("lockstep", [False, True], ids=["single", "lockstep"])
def test_a_bf16_run_stopped_mid_pass_resumes_bit_for_bit(tmp_path, monkeypatch, lockstep):
    """Stopped at pass 2, step 3 and resumed, bf16 runs (alone or a lockstep group) end with
    the weights and metrics of bf16 runs never stopped, in bf16."""
    data = synthetic(n=110)
    configs = [_config(seed=s, precision="bf16") for s in (0, 1)][: 2 if lockstep else 1]

    def run(outs, **kw):
        if lockstep:
            return train_lockstep(configs, outs, dataset=data, progress=False, **kw)
        return [train(configs[0], outs[0], dataset=data, progress=False, **kw)]

    whole = [tmp_path / f"whole{i}" for i in range(len(configs))]
    cut = [tmp_path / f"cut{i}" for i in range(len(configs))]
    run(whole)
    with monkeypatch.context() as m:
        _limit_after(m, 10)
        with pytest.raises(TimeLimitReached, match="pass 2, step 3"):
            run(cut, stop_at=time.time() + 3600)
    monkeypatch.setattr(precision, "step_seconds", _no_timing)
    summaries = (
        run(cut, resume=True) if lockstep else [resume(cut[0], dataset=data, progress=False)]
    )
    for c, w, summary in zip(cut, whole, summaries):
        assert summary["precision"] == "bf16"
        assert_bitwise_equal(weights(c), weights(w))
        strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(c)]
        assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(w)]


@pytest.mark.parametrize(
    "layers, k, estimator", [(1, 3, "reparam"), (2, 12, "dreg")], ids=["L1-k3", "L2-k12-dreg"]
)
def test_in_a_bf16_step_only_the_networks_compute_in_bf16(layers, k, estimator):
    """In a bf16 step the networks' matmuls run in bf16, while the log-weights, the bound, the
    gradient surrogates and every reduction and log-density run in float32; the gradients
    and Adam's moments are float32 too."""
    torch.manual_seed(0)
    hidden = [[32]] if layers == 1 else [[32], [16]]
    model = VAE(ModelConfig(latent=[8] if layers == 1 else [8, 4], hidden=hidden))
    objective = Objective("iwae", k=k, estimator=estimator)
    x = torch.bernoulli(torch.full((5, 784), 0.3), generator=torch.Generator().manual_seed(1))
    log = DtypeLog()
    with precision.step_context(model, "bf16"), log:
        log_w = objective.log_weights(model, x, torch.Generator().manual_seed(2))
        values = (objective.bound(log_w), objective.encoder_surrogate(log_w))
    assert log_w.dtype == torch.float32 and all(v.dtype == torch.float32 for v in values)
    assert {"addmm", "mm"} & log.ops_in(torch.bfloat16)  # the networks ran in bf16
    assert not REDUCTIONS & log.ops_in(torch.bfloat16), REDUCTIONS & log.ops_in(torch.bfloat16)
    assert {"logsumexp", "sum"} <= log.ops_in(torch.float32)
    assert model.network_dtype is None  # only inside the step

    optimizer = adam(model.parameters())
    with precision.step_context(model, "bf16"):
        train_step(model, objective, optimizer, x, torch.Generator().manual_seed(2))
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    states = list(optimizer.state.values())
    assert states and all(
        s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states
    )


def test_fp32_steps_are_the_plain_float32_steps():
    """fp32: no autocast and no bf16 op anywhere in a step, and the same numbers, bit for bit,
    as the step without any precision context."""
    objective = Objective("iwae", k=12)
    x = torch.bernoulli(torch.full((5, 784), 0.3), generator=torch.Generator().manual_seed(1))
    results = []
    for context in (True, False):
        torch.manual_seed(0)
        model = VAE(ModelConfig(latent=[8, 4], hidden=[[32], [16]]))
        optimizer, log = adam(model.parameters()), DtypeLog()
        with log:
            for s in range(3):
                g = torch.Generator().manual_seed(s)
                if context:
                    with precision.step_context(model, "fp32"):
                        train_step(model, objective, optimizer, x, g)
                else:
                    train_step(model, objective, optimizer, x, g)
        assert not log.ops_in(torch.bfloat16)
        results.append(model.state_dict())
    assert_bitwise_equal(*results)


def test_evaluation_of_a_bf16_run_is_float32(tmp_path, monkeypatch):
    """The test bounds logged while a bf16 run trains, and its evaluation afterwards, compute
    in float32 only (their log-weights are float32, no op runs in bf16)."""
    logs = []
    logged = iwae.engine.test_bounds

    def test_bounds(model, *args, **kw):
        assert model.network_dtype is None
        logs.append(DtypeLog())
        with logs[-1]:
            return logged(model, *args, **kw)

    monkeypatch.setattr(iwae.engine, "test_bounds", test_bounds)
    data = synthetic(n=110)
    train(_config(precision="bf16"), tmp_path / "r", dataset=data, progress=False)
    assert logs and not any(log.ops_in(torch.bfloat16) for log in logs)

    _, model = load_run(tmp_path / "r")
    dtypes, log_weights = [], model.log_weights

    def recorded(*args, **kw):
        out = log_weights(*args, **kw)
        dtypes.append(out.dtype)
        return out

    model.log_weights = recorded
    log = DtypeLog()
    with log:
        result = evaluate(model, torch.from_numpy(data.test[:8]).bernoulli(), k=32)
    assert np.isfinite(result["nll"]) and dtypes and set(dtypes) == {torch.float32}
    assert not log.ops_in(torch.bfloat16)


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    for flags, native in (
        ({"avx2", "avx512_bf16"}, True),
        ({"amx_bf16", "amx_tile"}, True),
        ({"avx2", "avx512f"}, False),
        (set(), False),
    ):
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: flags)
        assert precision.native_bf16(torch.device("cpu")) is native


@pytest.mark.parametrize(
    "native, times, chosen",
    [
        (True, {"fp32": 2.0, "bf16": 1.0}, "bf16"),
        (True, {"fp32": 1.0, "bf16": 2.0}, "fp32"),
        (True, {"fp32": 1.0, "bf16": 0.85}, "fp32"),  # within the margin: not faster enough
        (True, {"fp32": 1.0, "bf16": 0.75}, "bf16"),
        (False, None, "fp32"),
    ],
    ids=["bf16-faster", "bf16-slower", "bf16-marginal", "bf16-past-the-margin", "not-native"],
)
def test_auto_chooses_by_the_measurement_and_records_it(
    tmp_path, monkeypatch, native, times, chosen
):
    """auto: bf16 where the CPU has native bf16 and bf16 steps are measured faster (by the
    margin), else fp32 (not measured without native bf16); config.json records the choice
    and what was asked, summary.json also the measurement; a second run of the same shape
    in the process is not measured again."""
    monkeypatch.setattr(precision, "_MEASURED", {})
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"} if native else {"avx2"})
    timed = []

    def step_seconds(model, objective, x):
        timed.append(tuple(x.shape))
        return dict(times)

    monkeypatch.setattr(precision, "step_seconds", step_seconds if native else _no_timing)
    data = synthetic(n=60)
    for seed in (0, 1):
        out = tmp_path / f"r{seed}"
        summary = train(
            _config(precision="auto", seed=seed, batch_size=20), out, dataset=data, progress=False
        )
        config = json.loads((out / "config.json").read_text())
        assert (config["precision"], config["precision_requested"]) == (chosen, "auto")
        assert (summary["precision"], summary["precision_requested"]) == (chosen, "auto")
        measured = {"native_bf16": native, **({"step_seconds": times} if native else {})}
        assert summary["precision_measured"] == measured
    assert timed == ([(20, 784)] if native else [])


def test_a_resumed_auto_run_keeps_its_precision(tmp_path, monkeypatch):
    """A run that decided bf16 resumes in bf16 without measuring again, even where bf16 would
    now be slower; a config.json without the keys (older runs) loads as fp32."""
    monkeypatch.setattr(precision, "_MEASURED", {})
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setattr(precision, "step_seconds", lambda m, o, x: {"fp32": 2, "bf16": 1})
    data = synthetic(n=110)
    out = tmp_path / "r"
    with monkeypatch.context() as m:
        _limit_after(m, 10)
        with pytest.raises(TimeLimitReached):
            train(_config(precision="auto"), out, dataset=data, progress=False, stop_at=1e12)
    monkeypatch.setattr(precision, "step_seconds", _no_timing)
    summary = resume(out, dataset=data, progress=False)
    assert (summary["precision"], summary["precision_requested"]) == ("bf16", "auto")
    assert load_config(out).precision == "bf16"

    config = json.loads((out / "config.json").read_text())
    for key in ("precision", "precision_requested"):
        del config[key]
    (out / "config.json").write_text(json.dumps(config))
    old = load_config(out)
    assert (old.precision, old.precision_requested) == ("fp32", None)


def test_auto_is_the_default_everywhere(capsys):
    """TrainConfig, and so iwae.fit, iwae train and iwae reproduce, default to auto."""
    assert TrainConfig().precision == "auto" and TrainConfig().precision_requested is None
    for command in ("train", "reproduce"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "evaluation is always fp32 (default: auto)" in " ".join(
            capsys.readouterr().out.split()
        )


def test_decide_without_auto_and_with_models_it_cannot_split(monkeypatch):
    """fp32 and bf16 are taken as asked (nothing measured); a model not built on
    GaussianLatentModel trains in fp32 under auto and is refused bf16; bad values are refused."""
    monkeypatch.setattr(precision, "step_seconds", _no_timing)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    config = _config().for_data(synthetic(n=20))
    model = VAE(config.model_config)
    for asked in ("fp32", "bf16"):
        decided, record = precision.decide(config.replace(precision=asked), model, None, "cpu")
        assert (decided.precision, decided.precision_requested, record) == (asked, None, None)

    class Own(torch.nn.Module):  # its own log_weights: networks and log-densities not apart
        def log_weights(self, x, k, generator=None, stop_q=False, noise=None):
            raise NotImplementedError

    decided, record = precision.decide(config.replace(precision="auto"), Own(), None, "cpu")
    assert (decided.precision, decided.precision_requested) == ("fp32", "auto")
    with pytest.raises(IwaeError, match="GaussianLatentModel"):
        precision.decide(config.replace(precision="bf16"), Own(), None, "cpu")
    with pytest.raises(IwaeError, match="precision must be one of auto, fp32, bf16"):
        TrainConfig(precision="fp16")


def test_runs_of_different_precision_never_share_a_lockstep_group(tmp_path):
    data = synthetic(n=60)
    configs = [_config(precision="fp32"), _config(precision="bf16", seed=1)]
    assert lockstep_key(configs[0]) != lockstep_key(configs[1])
    with pytest.raises(IwaeError, match="lockstep"):
        train_lockstep(configs, [tmp_path / "a", tmp_path / "b"], dataset=data, progress=False)


def test_precision_on_train_reproduce_and_fit(tmp_path, monkeypatch, capsys):
    """iwae train --precision, iwae reproduce --precision (an override of every run) and
    iwae.fit(precision=...), which continues its run when called again with auto."""
    data = synthetic(n=60)
    path = tmp_path / "data.npz"
    np.savez(path, train=data.train, test=data.test)
    argv = ["train", "--dataset", str(path), "--latent", "4", "--hidden", "16", "--epochs", "1"]
    argv += ["--eval-n", "10", "--stage-nll-k", "0", "--precision", "bf16", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    assert load_config(tmp_path / "cli").precision == "bf16"

    seen = {}

    def reproduce(name, out, **kw):
        seen.update(kw)
        return []

    monkeypatch.setattr(iwae.experiments, "reproduce", reproduce)
    main(["reproduce", "table1", "--out", str(tmp_path / "exp"), "--precision", "bf16"])
    assert seen["overrides"] == {"precision": "bf16"}
    main(["reproduce", "table1", "--out", str(tmp_path / "exp")])
    assert seen["overrides"] is None

    monkeypatch.setattr(precision, "cpu_flags", lambda: set())  # auto: fp32, nothing measured
    kw = dict(out=tmp_path / "fit", k=2, epochs=1, latent=[4], hidden=[[16]], eval_n=10)
    first = fit(None, "iwae", data, precision="auto", stage_nll_k=0, progress=False, **kw)
    again = fit(None, "iwae", data, precision="auto", stage_nll_k=0, progress=False, **kw)
    assert first == again and first["precision"] == "fp32"
    with pytest.raises(IwaeError, match="precision"):
        fit(None, "iwae", data, precision="bf16", stage_nll_k=0, progress=False, **kw)


def test_the_two_precisions_are_timed_in_turn_on_copies(monkeypatch):
    """step_seconds times fp32 and bf16 steps alternately (a change of load while timing
    weighs on both alike), each on a copy of the model, whose own weights stay as they were;
    the medians are of real, positive step times."""
    monkeypatch.setattr(precision, "TIMING_SECONDS", 1e9)  # every one of TIMING_STEPS
    order = []

    def recording_step(model, objective, optimizer, x, generator, params):
        order.append(model.network_dtype)
        return train_step(model, objective, optimizer, x, generator, params)

    monkeypatch.setattr(precision, "train_step", recording_step)
    model = VAE(ModelConfig(x_dim=30, latent=(4,), hidden=((16,),)))
    before = {n: v.clone() for n, v in model.state_dict().items()}
    x = torch.bernoulli(torch.full((5, 30), 0.3), generator=torch.Generator().manual_seed(0))
    times = precision.step_seconds(model, Objective("iwae", k=3), x)
    steps = precision.TIMING_WARMUP + precision.TIMING_STEPS
    assert order == [None, torch.bfloat16] * steps
    assert set(times) == {"fp32", "bf16"} and all(0 < t < 1 for t in times.values())
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in before.items())
