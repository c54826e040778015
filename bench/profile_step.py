"""Where a training step's time goes: the step of ``bench/run.py`` (iwae's own, as the
engine runs it) under ``torch.profiler``, its CPU time split into matrix products, casts
between precisions, Adam and everything else, with the number of torch operators it calls.

    python bench/profile_step.py [--k 50] [--layers 1] [--batch 20] [--threads 1]
                                 [--precision bf16] [--steps 50] [--data-dir D] [--out FILE]

Self CPU time of each operator (time in it, not in what it calls), summed by kind; the
shares are of the profiled step's wall time, and the rest ("not in operators") is Python,
the autograd engine and the profiler's own work. On a machine where other work runs, the shares hold
better than the milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from run import cpu_model  # noqa: E402
from worker_iwae import load_data, make_train_step, prepare_data  # noqa: E402

from iwae.memory import reuse_freed_memory  # noqa: E402

#: operators by kind, by their profiler names
KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "casts": ("aten::copy_", "aten::_to_copy"),
    "adam": ("aten::_fused_adam_",),
}


def profile_steps(step, steps: int) -> dict:
    """``steps`` calls of ``step`` timed, then profiled: ms per step (unprofiled), operator
    calls per step and the self CPU ms per step of each kind of :data:`KINDS` and the rest."""
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    ms = (time.perf_counter() - t0) / steps * 1e3
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    profiled_ms = (time.perf_counter() - t0) / steps * 1e3
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    per = 1e3 * steps  # profiler microseconds in all -> milliseconds a step
    by_kind = {kind: 0.0 for kind in (*KINDS, "other operators")}
    for e in events:
        kind = next((k for k, names in KINDS.items() if e.key in names), "other operators")
        by_kind[kind] += e.self_cpu_time_total / per
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {
        "ms_per_step": ms,
        "profiled_ms_per_step": profiled_ms,
        "operator_calls_per_step": sum(e.count for e in events) / steps,
        "self_ms_per_step": by_kind,
        "top_operators": [
            {"name": e.key, "calls": e.count / steps, "self_ms": e.self_cpu_time_total / per}
            for e in top
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--layers", type=int, default=1, choices=(1, 2))
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--data-dir")
    ap.add_argument("--out", help="also write the result as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    reuse_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "data_dir": args.data_dir or os.environ.get("IWAE_DATA") or "../shared/data",
            "data_file": str(Path(tmp) / "data.npz"),
            "n_train_pool": 10_000,
            "n_test": 100,
        }
        source = prepare_data(spec)
        train_x, _, pixel_mean = load_data(spec)
    step, _ = make_train_step(
        args.layers, args.k, args.batch, train_x, pixel_mean, precision=args.precision
    )
    for _ in range(20):  # warm up: allocations, the first pass's binarization
        step()
    result = {
        "settings": vars(args),
        "data": source,
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
    }
    result.update(profile_steps(step, args.steps))
    wall = result["profiled_ms_per_step"]
    print(
        f"{args.precision}, k={args.k}, {args.layers} layer(s), batch {args.batch}, "
        f"{args.threads} thread(s), {result['cpu_model']}: {result['ms_per_step']:.2f} ms a "
        f"step ({wall:.2f} ms profiled), {result['operator_calls_per_step']:.0f} aten operator "
        "calls (nested ones too); self CPU time of the profiled step:"
    )
    for kind, ms in result["self_ms_per_step"].items():
        print(f"  {kind:16s} {ms:6.2f} ms  {ms / wall:6.1%}")
    rest = wall - sum(result["self_ms_per_step"].values())
    print(f"  {'not in operators':16s} {rest:6.2f} ms  {rest / wall:6.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
