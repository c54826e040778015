"""Is one version of iwae slower than another? Interleaved A/B timing of two checkouts and pythae.

    python bench/compare.py --baseline PATH [--rounds 5] [--no-pythae] [--quick] [--data-dir D]
                            [--out FILE.json]

``PATH`` is another checkout of this repository (``git worktree add PATH COMMIT``). Each
round measures, for this checkout, the baseline and pythae in a rotated order, the three
numbers ``bench/run.py`` reports against pythae: training examples/s at k=50 and at k=5
(1 layer, batch 20) and evaluation images/s at k=5,000 (1 layer). Each checkout runs its
own ``bench/worker_iwae.py`` on its own ``src/``, so the baseline is measured as it was.

On a shared machine a library's rate moves by tens of percent from one minute to the next;
a ratio of two numbers measured seconds apart, in the same round, moves much less. So the
ratios are taken within each round and summarized by their median and range over the
rounds: ``this ÷ pythae``, ``baseline ÷ pythae`` and ``this ÷ baseline``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from run import (  # noqa: E402
    DEFAULT_PYTHAE_PY,
    EVAL_K,
    FULL,
    QUICK,
    Runner,
    cpu_model,
    default_data_dir,
)

#: what each round measures: (key, phase, spec)
MEASURES = [
    ("train_k50", "train", {"jobs": [{"layers": 1, "k": 50, "batch": 20}]}),
    ("train_k5", "train", {"jobs": [{"layers": 1, "k": 5, "batch": 20}]}),
    ("eval", "eval", {"layers": 1, "k": EVAL_K, "warmup_images": 6}),
]
#: images per evaluation measurement (pythae's evaluation is slower: fewer images)
EVAL_IMAGES = {"iwae": 60, "pythae": 20}
QUICK_EVAL_IMAGES = {"iwae": 4, "pythae": 2}


def _rate(result: dict, phase: str) -> float:
    """examples/s of a train phase, images/s of an eval phase."""
    return result["results"][0]["examples_per_s"] if phase == "train" else result["images_per_s"]


def reuses_freed_memory(root: Path) -> bool:
    """Whether the checkout at ``root`` keeps freed memory for reuse when it trains on the CPU
    (iwae.memory.reuse_freed_memory, first in iwae.runs): its workers then start with that
    setting, as it trains; an older checkout's with glibc's defaults, as it trained."""
    sources = (root / "src" / "iwae" / name for name in ("memory.py", "runs.py"))
    return any(p.exists() and "def reuse_freed_memory(" in p.read_text() for p in sources)


def _measure(runner: Runner, arm: dict, base: dict, quick: bool) -> dict[str, float]:
    """One arm's three rates, measured one after another (``quick``: tiny timings)."""
    rates = {}
    for key, phase, spec in MEASURES:
        spec = {**base, **spec, "phase": phase, "label": f"{arm['name']} {key}"}
        spec["reuse_freed_memory"] = arm["reuse_freed_memory"]
        if phase == "train":
            spec["timing"] = (QUICK if quick else FULL)["timing"]
        else:
            spec["n_images"] = (QUICK_EVAL_IMAGES if quick else EVAL_IMAGES)[arm["kind"]]
            if arm["kind"] == "pythae":
                spec["batch_sizes"] = FULL["pythae_eval_batch_sizes"]
        result = runner.run(arm["python"], arm["worker"], spec, root=arm["root"])
        rates[key] = _rate(result, phase)
    return rates


def _summary(rounds: list[dict], a: str, b: str) -> dict:
    """a ÷ b of each measure: per round, then its median, min and max over the rounds."""
    out = {}
    for key, _, _ in MEASURES:
        r = [x[a][key] / x[b][key] for x in rounds]
        out[key] = {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds": r}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="another checkout of this repository")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the three arms (default 5)")
    p.add_argument("--no-pythae", action="store_true", help="the two checkouts only")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny timings, noisy")
    p.add_argument("--pythae-python", default=str(DEFAULT_PYTHAE_PY))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    p.add_argument("--data-dir", default=None, help="directory holding mnist/")
    p.add_argument("--out", default=str(HERE / "compare.json"))
    args = p.parse_args(argv)
    baseline = Path(args.baseline).resolve()
    if not (baseline / "bench" / "worker_iwae.py").exists():
        p.error(f"{baseline} is not a checkout of iwae (no bench/worker_iwae.py)")
    if not args.no_pythae and not Path(args.pythae_python).exists():
        p.error(
            f"{args.pythae_python} not found: run `bash bench/setup_pythae.sh` first, or pass "
            "--no-pythae"
        )
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count()
    arms = [
        {"name": "this", "kind": "iwae", "root": ROOT},
        {"name": "baseline", "kind": "iwae", "root": baseline},
        {"name": "pythae", "kind": "pythae", "root": ROOT, "python": args.pythae_python},
    ][: 2 if args.no_pythae else 3]
    for arm in arms:
        arm.setdefault("python", sys.executable)
        arm["worker"] = f"worker_{arm['kind']}.py"
        arm["reuse_freed_memory"] = arm["kind"] == "iwae" and reuses_freed_memory(arm["root"])
    started, load = time.perf_counter(), list(os.getloadavg())
    names = ", ".join(["this checkout", str(baseline), *(["pythae"] if len(arms) == 3 else [])])
    print(f"iwae A/B: {names}; {threads} thread(s), {cpu_model()}")
    rounds = []
    with tempfile.TemporaryDirectory(prefix="iwae-compare-") as tmp:
        runner = Runner(threads, Path(tmp))
        base = {"data_file": str(Path(tmp) / "data.npz")}
        runner.run(
            sys.executable,
            "worker_iwae.py",
            {
                **base,
                "phase": "meta",
                "label": "data",
                "data_dir": args.data_dir or default_data_dir(),
                "n_train_pool": FULL["n_train_pool"],
                "n_test": 64,
                "matmul_shapes": {},
                "matmul_s": 0.0,
                "step_rows": [],
            },
        )
        for i in range(args.rounds):
            first = i % len(arms)
            order = arms[first:] + arms[:first]  # each arm goes first in turn
            rounds.append({arm["name"]: _measure(runner, arm, base, args.quick) for arm in order})
    pairs = [("this", "pythae"), ("baseline", "pythae")] if len(arms) == 3 else []
    result = {
        **{f"{a}_vs_{b}": _summary(rounds, a, b) for a, b in pairs},
        "this_vs_baseline": _summary(rounds, "this", "baseline"),
        "rounds": rounds,
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "baseline": str(baseline),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "threads": threads,
            "mode": "quick" if args.quick else "full",
            "python": platform.python_version(),
            "load_average_at_start": load,
            "total_seconds": round(time.perf_counter() - started, 1),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\nmedian [min, max] over rounds of the per-round ratio")
    for name in [f"{a}_vs_{b}" for a, b in pairs] + ["this_vs_baseline"]:
        cells = [
            f"{key} {v['median']:.2f} [{v['min']:.2f}, {v['max']:.2f}]"
            for key, v in result[name].items()
        ]
        print(f"{name:<20} " + "   ".join(cells))
    print(f"wrote {out} in {result['meta']['total_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
