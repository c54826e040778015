# Showed: fused Adam, 4,096-row evaluation chunks, sigmoid-form tanh pay; torch.compile, bf16 don't.
"""Speed experiments for iwae's training step and evaluation (prototypes, not the package).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/prototypes/experiments_speed.py \
        [train|eval|micro|all] [--rounds 7] [--only V ...] [--out FILE] \
        [--precision fp32|bf16] [--threads N]

``--precision`` and ``--threads`` apply to the training variants (every one of them, the
baseline too): the networks under bf16 autocast as iwae's bf16 steps run them, on N threads.

Every variant is compared with the baseline IN THE SAME PROCESS, interleaved in rounds
(baseline, variant 1, variant 2, ..., then again), and the median time per round is
used, so that the load of a shared machine affects all variants alike. Reported:
speed relative to the baseline (> 1 is faster), plus compile time where relevant.

Training variants (1 stochastic layer, batch 20, k = 5 and 50, the loop of iwae.train):
  adam_foreach / adam_fused          torch.optim.Adam(foreach=True) / Adam(fused=True)
  ll_plain / ll_bce                  log p(x|h) as sum(x*l - softplus(l)) / -BCE-with-logits
                                     instead of iwae's a.(W^T x) + b.x - sum softplus(l)
  ll_compiled                        iwae's log p(x|h) head under torch.compile
  ll_hybrid                          the direct form below 10 samples per example, iwae's form above
  proposed                           ll_hybrid + Adam(fused=True): the changes proposed for src/iwae
  merged_gauss                       one Linear for (mean, log-std) of each Gaussian layer
  compile_lw / compile_lw_maxauto    torch.compile(model.log_weights), default /
                                     max-autotune-no-cudagraphs
  compile_step                       torch.compile of the whole step (zero_grad, forward,
                                     backward, Adam)
  threads2                           the baseline under torch.set_num_threads(2)
  torch_tanh                         torch.tanh in every hidden layer instead of iwae.model.Tanh
                                     (2 sigmoid(2x) - 1 on large CPU tensors)
Evaluation variants (1 layer, k = 5000, a few MNIST test images,
iwae.evaluate.log_weight_reductions):
  max_rows=R                         chunk size (default 32768); other R draw other samples, so
                                     their NLL differs by Monte Carlo noise, not error
  out_layer_bf16                     only the 200 -> 784 logits matmul in bf16
  mm_bf16                            fp32 matmuls computed by oneDNN in bf16 (fp32 in/out)
  autocast_bf16                      torch.autocast("cpu", bfloat16) around the evaluation
  compile_lw                         torch.compile(model.log_weights) (dynamic shapes)
  compile_lw+max_rows=4096           both
  threads2                           torch.set_num_threads(2)
  torch_tanh+max_rows=4096           torch.tanh instead of iwae.model.Tanh, against max_rows=4096
  NLL differences are reported against the fp32 baseline with the same seed (same eps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iwae.bounds import Objective
from iwae.data import binarize_fixed, load_mnist
from iwae.evaluate import log_weight_reductions
from iwae.model import VAE, GaussianLayer, ModelConfig, Tanh, bernoulli_log_prob
from iwae.precision import step_context

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))  # the repository: bench/prototypes/ is two below


def load_images(n_train=2000, n_test=64):
    try:
        d = load_mnist(
            os.environ.get("IWAE_DATA") or os.path.join(ROOT, "..", "shared", "data"),
            download=False,
        )
        return torch.from_numpy(d["train"][:n_train].copy()), torch.from_numpy(
            binarize_fixed(d["test"][:n_test])
        )
    except Exception:
        rng = np.random.default_rng(0)
        tr = rng.random((n_train, 784), dtype=np.float32) ** 6
        te = (
            rng.random((n_test, 784), dtype=np.float32)
            < rng.random((n_test, 784), dtype=np.float32) ** 6
        )
        return torch.from_numpy(tr), torch.from_numpy(te.astype(np.float32))


# -- model variants ---------------------------------------------------------------------


def ll_plain(self, x, h1):
    return bernoulli_log_prob(self.logits(h1), x)


def ll_bce(self, x, h1):
    logits = self.logits(h1)
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(
        -1
    )


def ll_hybrid(self, x, h1):
    """The change proposed for iwae.model.VAE.log_likelihood: the direct form when an
    example has few samples (the extra x @ W and its gradient cost more than they save),
    iwae's a.(W^T x) + b.x form otherwise."""
    out = self.output_layer
    a = self.decoder[0][:-1](h1)
    if h1.dim() < 3 or h1.shape[0] < 10:
        logits = out(a)
        return x.mul(logits).sub_(F.softplus(logits)).sum(-1)
    return (a * (x @ out.weight)).sum(-1) + x @ out.bias - F.softplus(out(a)).sum(-1)


def _ll_head(a, xw, xb, w, b):
    return (a * xw).sum(-1) + xb - F.softplus(F.linear(a, w, b)).sum(-1)


_ll_head_compiled = None


def ll_compiled(self, x, h1):
    global _ll_head_compiled
    if _ll_head_compiled is None:
        _ll_head_compiled = torch.compile(_ll_head, dynamic=False)
    out = self.output_layer
    a = self.decoder[0][:-1](h1)
    return _ll_head_compiled(a, x @ out.weight, x @ out.bias, out.weight, out.bias)


def ll_out_bf16(self, x, h1):
    """iwae's log p(x|h) with only the 200 -> 784 logits matmul in bf16 (fp32 after)."""
    out = self.output_layer
    a = self.decoder[0][:-1](h1)
    logits = F.linear(a.bfloat16(), out.weight.bfloat16(), out.bias.bfloat16()).float()
    return (a * (x @ out.weight)).sum(-1) + x @ out.bias - F.softplus(logits).sum(-1)


def merged_forward(self, u):
    a = self.net(u)
    w = torch.cat([self.mean.weight, self.scale.weight])
    b = torch.cat([self.mean.bias, self.scale.bias])
    mean, log_std = F.linear(a, w, b).chunk(2, -1)
    return mean, log_std


def make_model(layers=1, seed=0, pixel_mean=None, variant=None):
    torch.manual_seed(seed)
    model = VAE(ModelConfig.preset(layers), pixel_mean=pixel_mean)
    if variant in ("ll_plain", "ll_bce", "ll_compiled", "ll_hybrid", "proposed"):
        model.log_likelihood = types.MethodType(
            ll_hybrid if variant == "proposed" else globals()[variant], model
        )
    if variant == "torch_tanh":  # before the sigmoid-form Tanh of iwae.model: torch.tanh everywhere
        for m in model.modules():
            if isinstance(m, nn.Sequential):
                for i, layer in enumerate(m):
                    if isinstance(layer, Tanh):
                        m[i] = nn.Tanh()
    if variant == "merged_gauss":
        for m in model.modules():
            if isinstance(m, GaussianLayer):
                m.forward = types.MethodType(merged_forward, m)
    return model


# -- training ---------------------------------------------------------------------------


def make_step(variant, k, batch, train_x, pixel_mean, layers=1, precision="fp32"):
    model = make_model(layers, 0, pixel_mean, variant)
    adam_kw = (
        {"foreach": True}
        if variant == "adam_foreach"
        else {"fused": True}
        if variant in ("adam_fused", "proposed")
        else {}
    )
    optimizer = torch.optim.Adam(
        model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-4, **adam_kw
    )
    objective = Objective("iwae", k=k)
    enc, dec = model.encoder_parameters(), model.decoder_parameters()
    if variant == "compile_lw":
        model.log_weights = torch.compile(model.log_weights, dynamic=False)
    if variant == "compile_lw_maxauto":
        model.log_weights = torch.compile(
            model.log_weights, mode="max-autotune-no-cudagraphs", dynamic=False
        )
    gen_x = torch.bernoulli(train_x, generator=torch.Generator().manual_seed(1))
    state = {"i": 0, "bound": torch.zeros(())}

    def body(xb):
        optimizer.zero_grad(set_to_none=True)
        with step_context(model, precision):
            log_w = model.log_weights(xb, objective.samples)
        value = objective.backward(log_w, enc, dec)
        optimizer.step()
        return value

    fn = torch.compile(body, dynamic=False) if variant == "compile_step" else body

    def step():
        i = state["i"]
        xb = gen_x[i : i + batch]
        state["i"] = (i + batch) % (gen_x.shape[0] - batch)
        state["bound"] += fn(xb) * batch

    return step, state


def _settle(n_threads: int, base: int = 1):
    """Back to ``base`` threads; after a variant with more, wait for the OpenMP workers to
    stop spinning, which would otherwise slow the next variant down."""
    torch.set_num_threads(base)
    if n_threads > base:
        time.sleep(0.5)


def bench_variants(
    makers: dict, n_steps: int, rounds: int, threads: dict, base_threads: int = 1
) -> dict:
    """makers: name -> () -> step. Warm-up (timed: includes compilation), then ``rounds``
    rounds timing every variant for ``n_steps`` steps, the order rotated each round.
    The speed-up uses the fastest round of each variant (the least disturbed by other
    jobs on a shared machine) against the fastest round of the two identical baselines
    (``baseline`` and ``baseline_repeat``, pooled); the same with medians is kept too.
    ``baseline_repeat``'s own ratio shows the noise level."""
    steps, out = {}, {}
    for name, mk in makers.items():
        torch.set_num_threads(threads.get(name, base_threads))
        t0 = time.perf_counter()
        steps[name] = mk()
        for _ in range(3):
            steps[name]()
        first = time.perf_counter() - t0
        _settle(threads.get(name, base_threads), base_threads)
        out[name] = {"warmup_s": first, "times": []}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            torch.set_num_threads(threads.get(name, base_threads))
            t0 = time.perf_counter()
            for _ in range(n_steps):
                steps[name]()
            out[name]["times"].append((time.perf_counter() - t0) / n_steps)
            _settle(threads.get(name, base_threads), base_threads)
    pooled = out["baseline"]["times"] + out.get("baseline_repeat", {"times": []})["times"]
    base_min, base_med = min(pooled), statistics.median(pooled)
    for r in out.values():
        r["min_s_per_step"] = min(r["times"])
        r["median_s_per_step"] = statistics.median(r["times"])
        r["speedup_vs_baseline"] = base_min / r["min_s_per_step"]
        r["speedup_vs_baseline_median"] = base_med / r["median_s_per_step"]
        # compile time ~ warm-up minus 3 steady steps
        r["compile_or_warmup_s"] = r["warmup_s"] - 3 * r["min_s_per_step"]
    return out


TRAIN_VARIANTS = [
    "baseline",
    "baseline_repeat",
    "adam_foreach",
    "adam_fused",
    "ll_plain",
    "ll_bce",
    "ll_compiled",
    "merged_gauss",
    "compile_lw",
    "compile_lw_maxauto",
    "compile_step",
    "threads2",
    "ll_hybrid",
    "proposed",
    "torch_tanh",
]


def run_train(rounds: int, only=None, precision: str = "fp32", threads: int = 1) -> dict:
    train_x, _ = load_images()
    pixel_mean = train_x.mean(0)
    results = {}
    for k, n_steps in ((5, 20), (50, 4)):
        torch._dynamo.reset()
        makers = {}
        for v in TRAIN_VARIANTS:
            if only and v not in only and v not in ("baseline", "baseline_repeat"):
                continue
            makers[v] = lambda v=v, k=k: make_step(
                None if v in ("baseline", "baseline_repeat", "threads2") else v,
                k,
                20,
                train_x,
                pixel_mean,
                precision=precision,
            )[0]
        r = bench_variants(makers, n_steps, rounds, {"threads2": 2}, base_threads=threads)
        results[f"k={k}"] = r
        print(
            f"\nTRAIN 1 layer, batch 20, k={k}, {precision}, {threads} thread(s): speed vs "
            f"baseline, best (median) of {rounds} rounds x {n_steps} steps"
        )
        for name, x in r.items():
            print(
                f"  {name:<20} {x['speedup_vs_baseline']:5.2f}x "
                f"({x['speedup_vs_baseline_median']:4.2f}x)   {1e3 * x['min_s_per_step']:7.2f} "
                f"ms/step   warm-up/compile {x['compile_or_warmup_s']:6.1f} s",
                flush=True,
            )
    return results


# -- evaluation -------------------------------------------------------------------------


def trained_model(train_x, pixel_mean, steps=300, k=5):
    model = make_model(1, 0, pixel_mean)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    xs = torch.bernoulli(train_x, generator=torch.Generator().manual_seed(2))
    for i in range(steps):
        xb = xs[(i * 20) % (xs.shape[0] - 20) :][:20]
        opt.zero_grad(set_to_none=True)
        Objective("iwae", k=k).backward(
            model.log_weights(xb, k), model.encoder_parameters(), model.decoder_parameters()
        )
        opt.step()
    return model.eval()


def _set_mm_bf16(on: bool):
    """oneDNN fp32 matmuls computed in bf16 (torch >= 2.9 API, older: matmul precision)."""
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16" if on else "ieee"
    except AttributeError:
        torch.set_float32_matmul_precision("medium" if on else "highest")


def run_eval(rounds: int, n_images: int = 12, k: int = 5000, only=None) -> dict:
    train_x, test_x = load_images()
    model = trained_model(train_x, train_x.mean(0))
    x = test_x[:n_images]
    compiled = make_model(1)
    compiled.load_state_dict(model.state_dict())
    compiled.eval()
    compiled.log_weights = torch.compile(compiled.log_weights, dynamic=True)

    out_bf16 = make_model(1)
    out_bf16.load_state_dict(model.state_dict())
    out_bf16.eval()
    out_bf16.log_likelihood = types.MethodType(ll_out_bf16, out_bf16)

    variants = {"baseline": dict(model=model), "baseline_repeat": dict(model=model)}
    for mr in (1000, 2500, 4096, 5000, 10000, 16384, 65536):
        variants[f"max_rows={mr}"] = dict(model=model, max_rows=mr)
    variants["out_layer_bf16"] = dict(model=out_bf16)
    variants["mm_bf16"] = dict(model=model, mm_bf16=True)
    variants["autocast_bf16"] = dict(model=model, autocast=True)
    variants["compile_lw"] = dict(model=compiled)
    variants["compile_lw+max_rows=4096"] = dict(model=compiled, max_rows=4096)
    variants["threads2"] = dict(model=model, threads=2)
    torch_tanh = make_model(1, variant="torch_tanh")
    torch_tanh.load_state_dict(model.state_dict())
    variants["torch_tanh+max_rows=4096"] = dict(model=torch_tanh.eval(), max_rows=4096)
    if only:
        variants = {
            n: v for n, v in variants.items() if n in ("baseline", "baseline_repeat") or n in only
        }

    def run(v, seed=0):
        torch.set_num_threads(v.get("threads", 1))
        if v.get("mm_bf16"):
            _set_mm_bf16(True)
        try:
            ctx = (
                torch.autocast("cpu", dtype=torch.bfloat16)
                if v.get("autocast")
                else torch.autocast("cpu", enabled=False)
            )
            with ctx:
                return log_weight_reductions(
                    v["model"], x, k, seed=seed, max_rows=v.get("max_rows", 32768)
                )
        finally:
            _set_mm_bf16(False)
            _settle(v.get("threads", 1))

    out = {}
    for name, v in variants.items():
        t0 = time.perf_counter()
        r = run(v)
        out[name] = {
            "first_call_s": time.perf_counter() - t0,
            "times": [],
            "nll": -r["log_px"].double().mean().item(),
            "max_abs_diff_log_px": None,
        }
        out[name]["_log_px"] = r["log_px"].double()
    base_lp = out["baseline"]["_log_px"]
    for name in out:
        lp = out[name].pop("_log_px")
        out[name]["nll_diff_vs_fp32"] = out[name]["nll"] - out["baseline"]["nll"]
        out[name]["max_abs_diff_log_px"] = (lp - base_lp).abs().max().item()
    names = list(variants)
    for rnd in range(rounds):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            run(variants[name])
            out[name]["times"].append(time.perf_counter() - t0)
            out[name].setdefault("minor_page_faults", []).append(
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0
            )
    pooled = out["baseline"]["times"] + out.get("baseline_repeat", {"times": []})["times"]
    base = min(pooled)
    print(
        f"\nEVAL 1 layer, k={k}, {n_images} images: speed vs baseline (max_rows=32768), best "
        f"(median) of {rounds} rounds"
    )
    for name, r in out.items():
        r["min_s"] = min(r["times"])
        r["median_s"] = statistics.median(r["times"])
        r["speedup_vs_baseline"] = base / r["min_s"]
        r["speedup_vs_baseline_median"] = statistics.median(pooled) / r["median_s"]
        r["images_per_s"] = n_images / r["min_s"]
        print(
            f"  {name:<16} {r['speedup_vs_baseline']:5.2f}x "
            f"({r['speedup_vs_baseline_median']:4.2f}x) {r['images_per_s']:6.1f} img/s  first call "
            f"{r['first_call_s']:5.1f} s  page faults/img "
            f"{statistics.median(r['minor_page_faults']) / n_images:8.0f}  NLL diff vs fp32 "
            f"{r['nll_diff_vs_fp32']:+.5f} (max per image {r['max_abs_diff_log_px']:.5f})",
            flush=True,
        )
    return out


# -- isolated micro-timings (min of repeats: robust on a shared machine) ----------------


def _tmin(f, n, reps=11):
    for _ in range(2):
        f()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def run_micro() -> dict:
    """Adam.step alone (default / foreach / fused), and log_weights forward+backward
    (batch 20) and an evaluation chunk (1 image x 4096 samples, inference mode) with
    iwae's Bernoulli term, the direct forms, and merged Gaussian heads."""
    res = {"adam_step_ms": {}, "log_weights_fwd_bwd_ms": {}, "eval_chunk_ms": {}}
    for name, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        m = make_model(1)
        for p_ in m.parameters():
            p_.grad = torch.randn_like(p_)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-4, **kw)
        res["adam_step_ms"][name] = 1e3 * _tmin(opt.step, 30, 15)
    print("\nAdam.step alone, ms:", {k: round(v, 3) for k, v in res["adam_step_ms"].items()})
    x = torch.bernoulli(torch.full((20, 784), 0.2), generator=torch.Generator().manual_seed(0))
    for k in (1, 5, 20, 50):
        r = {}
        for v in ("baseline", "ll_plain", "ll_bce", "ll_hybrid", "merged_gauss"):
            m = make_model(1, 0, None, None if v == "baseline" else v)

            def f(m=m, k=k):
                m.log_weights(x, k).logsumexp(0).sum().backward()

            r[v] = 1e3 * _tmin(f, max(4, 200 // (k + 4)))
        res["log_weights_fwd_bwd_ms"][f"k={k}"] = r
        print(
            f"log_weights fwd+bwd, batch 20, k={k}, ms (speed-up):",
            {n: f"{t:.2f} ({r['baseline'] / t:.2f}x)" for n, t in r.items()},
            flush=True,
        )
    x1 = x[:1]
    r = {}
    for v in ("baseline", "ll_plain", "ll_bce"):
        m = make_model(1, 0, None, None if v == "baseline" else v)

        def f(m=m):
            with torch.inference_mode():
                m.log_weights(x1, 4096)

        r[v] = 1e3 * _tmin(f, 5)
    res["eval_chunk_ms"] = r
    print(
        "eval chunk, 1 image x 4096 samples, ms (speed-up):",
        {n: f"{t:.2f} ({r['baseline'] / t:.2f}x)" for n, t in r.items()},
    )
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", nargs="?", default="all", choices=["train", "eval", "micro", "all"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--only", nargs="*", default=None, help="variants to run (with the baseline)")
    p.add_argument("--eval-images", type=int, default=12)
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="train: the networks' precision (iwae.precision.step_context)",
    )
    p.add_argument("--threads", type=int, default=1, help="train: threads of every variant")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load "
        f"{os.getloadavg()}"
    )
    res = {"torch": torch.__version__, "load_average_at_start": os.getloadavg()}
    if args.what in ("train", "all"):
        res["train"] = run_train(args.rounds, args.only, args.precision, args.threads)
        res["train_settings"] = {"precision": args.precision, "threads": args.threads}
    if args.what in ("micro", "all"):
        res["micro"] = run_micro()
    if args.what in ("eval", "all"):
        res["eval"] = run_eval(args.rounds, args.eval_images, only=args.only)
    res["load_average_at_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
