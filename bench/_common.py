"""Helpers shared by the benchmark workers (iwae's venv and pythae's venv).

Stdlib only at import time: the orchestrator (bench/run.py) imports this module too
and must stay small, so that the peak RSS of the workers it spawns is theirs alone.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

# -- memory -----------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """High-water resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- timing -----------------------------------------------------------------------------


def time_steps(step, warmup_steps: int, warmup_s: float, repeats: int, min_s: float) -> dict:
    """Call ``step()`` (no arguments) ``warmup_steps`` times and for at least
    ``warmup_s`` seconds, then ``repeats`` times for at least ``min_s`` seconds each.

    Returns the steps and seconds of every repeat and the median and best steps/s.
    """
    t0 = time.perf_counter()
    n = 0
    while n < warmup_steps or time.perf_counter() - t0 < warmup_s:
        step()
        n += 1
    runs = []
    for _ in range(repeats):
        n = 0
        t0 = time.perf_counter()
        while True:
            step()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        runs.append({"steps": n, "seconds": dt, "steps_per_s": n / dt})
    rates = [r["steps_per_s"] for r in runs]
    return {
        "runs": runs,
        "median_steps_per_s": statistics.median(rates),
        "best_steps_per_s": max(rates),
    }


def time_course(step, seconds: float, window_s: float) -> dict:
    """Call ``step()`` (no arguments) for ``seconds`` from the first step on, with no
    warm-up, and count the steps of each ``window_s``-second window: how a training
    rate moves as training goes on (a window ends at the first step past its length)."""
    windows = []
    start = t0 = time.perf_counter()
    n = total = 0
    while True:
        step()
        n += 1
        total += 1
        now = time.perf_counter()
        if now - t0 >= window_s:
            windows.append(
                {
                    "end_s": now - start,
                    "steps_total": total,
                    "steps": n,
                    "steps_per_s": n / (now - t0),
                }
            )
            n, t0 = 0, now
            if now - start >= seconds:
                return {"windows": windows}


# -- FLOP model -------------------------------------------------------------------------


def linear_layers(x_dim: int, latent, hidden):
    """Every nn.Linear of Burda et al.'s model as (d_in, d_out, per_sample, input_needs_grad).

    ``per_sample``: run once per importance sample (else once per example: only the
    first encoder network, which sees x, not a sample). ``input_needs_grad``: False only
    for the first encoder layer, whose input is the data.
    Encoder l: sizes[l] -> hidden[l] -> (mean, scale) of latent[l] (two Linear layers).
    Decoder 0: latent[0] -> reversed(hidden[0]) -> x_dim (Bernoulli logits).
    Decoder l >= 1: latent[l] -> reversed(hidden[l]) -> (mean, scale) of latent[l-1].
    """
    sizes = (x_dim, *latent)
    layers = []
    for l in range(len(latent)):
        per_sample = l > 0
        d = sizes[l]
        for i, h in enumerate(hidden[l]):
            layers.append((d, h, per_sample, not (l == 0 and i == 0)))
            d = h
        layers += [(d, latent[l], per_sample, True)] * 2
    for l in range(len(latent)):
        d = latent[l]
        for h in reversed(hidden[l]):
            layers.append((d, h, True, True))
            d = h
        layers += [(d, x_dim, True, True)] if l == 0 else [(d, sizes[l], True, True)] * 2
    return layers


def train_flops_per_example(x_dim: int, latent, hidden, k: int) -> float:
    """Matmul FLOPs of one training example with k samples, forward + backward.

    A Linear d_in -> d_out costs 2*d_in*d_out per row forward, the same again for the
    weight gradient, and the same again for the input gradient when its input needs one:
        F_train(k) = sum_{per-example layers} 2 d_in d_out (1 + 1 + g)
                   + k * sum_{per-sample layers} 2 d_in d_out (1 + 1 + g),   g in {0, 1}.
    Elementwise work (tanh, exp, softplus, the log-densities, Adam) is not counted.
    """
    total = 0.0
    for d_in, d_out, per_sample, needs_grad in linear_layers(x_dim, latent, hidden):
        f = 2.0 * d_in * d_out * (2 + int(needs_grad))
        total += f * (k if per_sample else 1)
    return total


def eval_flops_per_sample(x_dim: int, latent, hidden, k: int) -> float:
    """Matmul FLOPs of one evaluation sample (forward only), the per-example encoder
    work shared by the k samples of an example:
        F_eval = sum_{per-sample layers} 2 d_in d_out + (1/k) sum_{per-example layers} 2 d_in d_out.
    """
    total = 0.0
    for d_in, d_out, per_sample, _ in linear_layers(x_dim, latent, hidden):
        f = 2.0 * d_in * d_out
        total += f if per_sample else f / k
    return total


# -- worker protocol --------------------------------------------------------------------


def worker_main(phases: dict) -> None:
    """``python WORKER.py SPEC_JSON OUT_JSON``: run ``phases[spec["phase"]](spec)`` and
    write its result, with this process's memory figures, to OUT_JSON."""
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    threads = spec.get("threads")
    import torch  # here, not at the top: the orchestrator imports this module without torch

    if threads:
        torch.set_num_threads(int(threads))
    # denormals flushed to zero where the spec says (bench/run.py: iwae's default, on;
    # pythae's, off)
    torch.set_flush_denormal(bool(spec.get("flush_denormal", False)))
    rss_after_import = current_rss_mib()
    result = phases[spec["phase"]](spec)
    result["memory"] = {
        "rss_after_import_mib": round(rss_after_import, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    result["torch_threads"] = torch.get_num_threads()
    # glibc's malloc settings this process started with (bench/run.py: REUSE_FREED_MEMORY_ENV)
    result["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    with open(out_path, "w") as f:
        json.dump(result, f)
