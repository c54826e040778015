"""iwae benchmark: training and evaluation throughput, peak memory, the matmul roofline,
and a correctness check, for iwae and (optionally) pythae, in one run on one machine.

    python bench/run.py [--quick] [--no-pythae] [--threads N] [--iwae-threads same|auto]
                        [--device auto|cpu|cuda|cuda:N] [--data-dir D] [--out bench/results.json]
    python bench/run.py --only precision [--quick] [--data-dir D] [--out FILE.json]
    python bench/run.py --only course [--quick] [--no-pythae] [--threads N] [--data-dir D]
                        [--out FILE.json]

See bench/README.md for what is measured and how each ratio is defined. This process
imports no torch: every phase runs in its own worker process (bench/worker_iwae.py with
this interpreter, bench/worker_pythae.py with bench/.venv-pythae/bin/python), so that
each phase's peak RSS is its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import eval_flops_per_sample, train_flops_per_example  # noqa: E402

DEFAULT_PYTHAE_PY = HERE / ".venv-pythae" / "bin" / "python"

#: torch.mm shapes (m, k, n): the layers of a training step (batch 20 x k=50 rows), of
#: an evaluation chunk (6 images x 5000 samples), and big squares.
MATMUL_SHAPES = {
    "train_dec_in (1000x50 @ 50x200)": (1000, 50, 200),
    "train_hidden (1000x200 @ 200x200)": (1000, 200, 200),
    "train_dec_out (1000x200 @ 200x784)": (1000, 200, 784),
    "eval_hidden (30000x200 @ 200x200)": (30000, 200, 200),
    "eval_dec_out (30000x200 @ 200x784)": (30000, 200, 784),
    "square 1024": (1024, 1024, 1024),
    "square 2048": (2048, 2048, 2048),
}

FULL = {
    "timing": {"warmup_steps": 5, "warmup_s": 1.0, "repeats": 3, "min_s": 2.0},
    "ks": [1, 5, 50],
    "layers": [1, 2],
    "batches": [20, 100],
    "eval_images": 120,
    "pythae_eval_images": 30,
    "pythae_eval_batch_sizes": [100, 1000],
    "correct_images": 8,
    "correct_train_steps": 200,
    "correct_max_rows": [None, 1000, 48],
    "matmul_s": 0.6,
    "n_train_pool": 2000,
    "grid_n_train": 6000,
    "groups_n_train": {"cuda": 4000, "cpu": 1000},
    "groups_epochs": 3,
}
QUICK = {
    "timing": {"warmup_steps": 2, "warmup_s": 0.0, "repeats": 1, "min_s": 0.15},
    "ks": [1, 5, 50],
    "layers": [1, 2],
    "batches": [20, 100],
    "eval_images": 6,
    "pythae_eval_images": 2,
    "pythae_eval_batch_sizes": [1000],
    "correct_images": 2,
    "correct_train_steps": 20,
    "correct_max_rows": [None, 48],
    "matmul_s": 0.05,
    "n_train_pool": 400,
    "grid_n_train": 400,
    "groups_n_train": {"cuda": 200, "cpu": 200},
    "groups_epochs": 2,
}
EVAL_K = 5000
#: the lockstep groups of the ``groups`` phase: (layers, k, runs in the group, cuda_graphs)
GROUPS = [
    (1, 50, 1, "auto"),
    (1, 50, 2, "auto"),
    (1, 50, 2, "off"),
    (2, 50, 2, "auto"),
    (2, 5, 2, "auto"),
]
TOLERANCE_NATS = 1e-3
#: the ``precision`` phase (``--only precision``): fp32 against bf16 training steps of IWAE,
#: Burda et al.'s models, on one thread
PRECISION = {"layers": [1, 2], "ks": [1, 5, 50], "batch": 20, "threads": 1}
#: the ``course`` phase (``--only course``): the k=50 training rate over the first
#: ``seconds`` of training from initialization, per window, on the whole MNIST training set
COURSE = {"job": {"layers": 1, "k": 50, "batch": 20}, "n_train_pool": 60000}
COURSE_TIMING = {
    "full": {"seconds": 120.0, "window_s": 10.0},
    "quick": {"seconds": 3.0, "window_s": 1.0},
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def lscpu_model_name() -> str | None:
    """``lscpu``'s "Model name" (None where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line]
    return names[0] if names else None


def phase_result(args, started: float, **fields) -> dict:
    """The JSON of a phase run alone (``--only``): when, by what command, on which CPU,
    the load average when it ended, ``fields``, and the seconds since ``started``."""
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "cpu_model": cpu_model(),
        "lscpu_model_name": lscpu_model_name(),
        "load_average": os.getloadavg(),
        "quick": args.quick,
        **fields,
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def write_result(args, result: dict) -> int:
    """Write ``result`` to ``--out`` (its folder made where missing); exit status 0."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['total_seconds']} s")
    return 0


def run_precision(args, cfg: dict, data_dir: str | None) -> int:
    """The ``precision`` phase alone (bench/worker_iwae.py): step times of fp32 and bf16
    training steps (:data:`PRECISION`), with the CPU's model name; writes ``--out``."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="iwae-bench-") as tmp:
        runner = Runner(PRECISION["threads"], Path(tmp), iwae_malloc=args.iwae_malloc)
        spec = {
            "phase": "precision",
            "label": "fp32 vs bf16",
            "data_file": str(Path(tmp) / "data.npz"),
            "data_dir": data_dir,
            "n_train_pool": cfg["n_train_pool"],
            "n_test": 64,
            "timing": cfg["timing"],
            **PRECISION,
        }
        r = runner.run(sys.executable, "worker_iwae.py", spec)
    result = phase_result(args, started, iwae_malloc=args.iwae_malloc, **r)
    print(f"fp32 vs bf16 training steps, batch {PRECISION['batch']}, 1 thread, {cpu_model()}")
    print("layers  k   fp32 ms  bf16 ms  bf16 speed-up  auto")
    for row in r["results"]:
        print(
            f"{row['layers']:>6} {row['k']:>3} {row['fp32_ms_per_step']:>8.2f} "
            f"{row['bf16_ms_per_step']:>8.2f} {row['bf16_speedup']:>13.2f}x  {row['auto_choice']}"
        )
    return write_result(args, result)


def run_course(args, threads: int, data_dir: str | None) -> int:
    """The ``course`` phase alone: iwae's k=50 training step (its defaults, denormals
    flushed) and pythae's, with denormals not flushed (torch's default) and flushed, each
    trained from initialization for the same seconds (:data:`COURSE`); the examples/s of
    each window and iwae's ratio to each pythae run per window. Writes ``--out``."""
    started = time.perf_counter()
    timing = COURSE_TIMING["quick" if args.quick else "full"]
    with tempfile.TemporaryDirectory(prefix="iwae-bench-") as tmp:
        runner = Runner(threads, Path(tmp), iwae_malloc=args.iwae_malloc)
        spec = {"phase": "course", "data_file": str(Path(tmp) / "data.npz"), **COURSE, **timing}
        spec.update({"data_dir": data_dir, "n_test": 64})
        if args.quick:
            spec["n_train_pool"] = 2000
        runs = {"iwae": runner.run(sys.executable, "worker_iwae.py", {**spec, "label": "iwae"})}
        pythae_runs = () if args.no_pythae else (("pythae", False), ("pythae_flushed", True))
        for name, flush in pythae_runs:
            label = name.replace("_", ", ")
            runs[name] = runner.run(
                args.pythae_python,
                "worker_pythae.py",
                {**spec, "label": label, "flush_denormal": flush},
            )
    batch = COURSE["job"]["batch"]
    rows = []
    for i, w in enumerate(runs["iwae"]["windows"]):
        row = {"window": i, "end_s": w["end_s"], "examples_seen": w["steps_total"] * batch}
        for name in ("iwae", "pythae", "pythae_flushed"):
            windows = runs[name]["windows"] if name in runs else []
            row[f"{name}_examples_per_s"] = (
                windows[i]["steps_per_s"] * batch if i < len(windows) else None
            )
        for name in ("pythae", "pythae_flushed"):
            other = row[f"{name}_examples_per_s"]
            row[f"iwae_vs_{name}"] = row["iwae_examples_per_s"] / other if other else None
        rows.append(row)
    result = phase_result(
        args,
        started,
        threads=threads,
        **COURSE,
        **timing,
        precision=runs["iwae"]["precision"],
        source=runs["iwae"]["source"],
        windows=rows,
        runs=runs,
    )
    print_course(result)
    return write_result(args, result)


def print_course(r: dict) -> None:
    job = r["job"]
    print(
        f"training rate from initialization, IWAE k={job['k']}, {job['layers']} layer, batch "
        f"{job['batch']}, {r['threads']} thread(s), {r['cpu_model']} (iwae in {r['precision']})"
    )
    print("window end s  iwae images  iwae ex/s  pythae ex/s  flushed ex/s  ratio  ratio flushed")
    for w in r["windows"]:
        print(
            f"{w['end_s']:>12.1f} {w['examples_seen']:>12,} {w['iwae_examples_per_s']:>10.0f} "
            f"{_fmt(w['pythae_examples_per_s'], '.0f'):>12} "
            f"{_fmt(w['pythae_flushed_examples_per_s'], '.0f'):>13} "
            f"{_fmt(w['iwae_vs_pythae']):>6} {_fmt(w['iwae_vs_pythae_flushed']):>14}"
        )


def default_data_dir() -> str | None:
    """--data-dir, else $IWAE_DATA, else ../shared/data beside the checkout (as the tests)."""
    for cand in (os.environ.get("IWAE_DATA"), ROOT.parent / "shared" / "data"):
        if cand and (Path(cand) / "mnist").is_dir():
            return str(cand)
    return None


#: glibc's settings of iwae.memory.reuse_freed_memory (its REUSE_MMAP_THRESHOLD and
#: REUSE_TRIM_THRESHOLD), as environment variables, which glibc reads when a process starts
REUSE_FREED_MEMORY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(512 << 20),
}


def worker_rows(result: dict, **extra) -> list[dict]:
    """A training worker's rows, each with the worker's ``memory`` and ``malloc_env`` and
    the settings ``extra`` it ran with."""
    keep = {"memory": result["memory"], "malloc_env": result["malloc_env"], **extra}
    return [{**x, **keep} for x in result["results"]]


class Runner:
    """Runs benchmark workers, one process each. ``iwae_malloc``: "reuse" (iwae's own
    setting when it trains on the CPU, :data:`REUSE_FREED_MEMORY_ENV`) or "glibc" (glibc's
    defaults) for iwae's workers; pythae's run at glibc's defaults unless a spec says."""

    def __init__(
        self, threads: int, workdir: Path, verbose: bool = True, iwae_malloc: str = "reuse"
    ):
        self.threads, self.workdir, self.verbose = threads, workdir, verbose
        self.iwae_malloc = iwae_malloc
        self.count = 0

    def run(self, python: str, worker: str, spec: dict, root: Path = ROOT) -> dict:
        """Run ``root/bench/worker`` (with ``root/src`` first on the path for iwae's worker)
        on ``spec``; its result."""
        self.count += 1
        spec_path = self.workdir / f"spec{self.count}.json"
        out_path = self.workdir / f"out{self.count}.json"
        spec = {"threads": self.threads, **spec}  # a phase may ask for its own thread count
        # denormals flushed: iwae's default (every iwae command); pythae's default is torch's, off
        spec.setdefault("flush_denormal", worker == "worker_iwae.py")
        # freed memory kept for reuse: iwae's default when training on the CPU
        # (iwae.memory.reuse_freed_memory); pythae's is glibc's
        spec.setdefault(
            "reuse_freed_memory", worker == "worker_iwae.py" and self.iwae_malloc == "reuse"
        )
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        env.update(
            {"OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
        )
        if spec["reuse_freed_memory"]:
            env.update(REUSE_FREED_MEMORY_ENV)
        if worker == "worker_iwae.py":
            src = str(root / "src")
            env["PYTHONPATH"] = src + (
                os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
            )
        else:
            env.pop("PYTHONPATH", None)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [python, str(root / "bench" / worker), str(spec_path), str(out_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{worker} phase {spec['phase']} failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-4000:]}"
            )
        result = json.loads(out_path.read_text())
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        if self.verbose:
            print(
                f"  [{worker.split('_')[1][:-3]}] {spec['phase']:<11} {spec.get('label', ''):<24} "
                f"{result['wall_s']:6.1f} s  peak RSS {result['memory']['peak_rss_mib']:7.1f} MiB",
                flush=True,
            )
        return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke test: tiny timings (well under a minute)"
    )
    p.add_argument("--no-pythae", action="store_true", help="measure iwae only")
    p.add_argument(
        "--pythae-python", default=str(DEFAULT_PYTHAE_PY), help="python of the pythae venv"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in every worker (default: $OMP_NUM_THREADS, else all CPUs)",
    )
    p.add_argument(
        "--iwae-threads",
        choices=("same", "auto"),
        default="same",
        help="iwae's training threads: the same as pythae's (--threads), or auto: what `iwae train "
        "--threads auto` picks for each configuration (1 for steps under 256 rows, else --threads)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory holding mnist/ (default: $IWAE_DATA or ../shared/data)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="where the groups phase trains lockstep groups: cpu, cuda, cuda:N or auto "
        "(default: auto, CUDA where torch sees it); every other phase measures the CPU",
    )
    p.add_argument(
        "--only",
        choices=("precision", "course"),
        help="run this phase alone: precision = fp32 against bf16 training steps (1 thread); "
        "course = the k=50 training rate of iwae and pythae (denormals flushed and not) per "
        "10-s window over the first 2 minutes of training from initialization",
    )
    p.add_argument(
        "--iwae-malloc",
        choices=("reuse", "glibc"),
        default="reuse",
        help="iwae's workers start with freed memory kept for reuse, as iwae trains on the CPU "
        "(reuse, the default), or with glibc's defaults (glibc: to measure what that setting "
        "is worth)",
    )
    p.add_argument("--out", default=str(HERE / "results.json"))
    args = p.parse_args(argv)

    cfg = QUICK if args.quick else FULL
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count()
    data_dir = args.data_dir or default_data_dir()
    if args.only == "precision":
        return run_precision(args, cfg, data_dir)
    use_pythae = not args.no_pythae
    if use_pythae and not Path(args.pythae_python).exists():
        p.error(
            f"{args.pythae_python} not found: run `bash bench/setup_pythae.sh` first, or pass "
            "--no-pythae"
        )
    if args.only == "course":
        return run_course(args, threads, data_dir)
    started = time.perf_counter()
    py_iwae, py_pythae = sys.executable, args.pythae_python

    with tempfile.TemporaryDirectory(prefix="iwae-bench-") as tmp:
        runner = Runner(threads, Path(tmp), iwae_malloc=args.iwae_malloc)
        data_file = str(Path(tmp) / "data.npz")
        base = {"data_file": data_file}
        print(
            f"iwae benchmark ({'quick' if args.quick else 'full'}), {threads} thread(s), "
            f"{cpu_model()}"
        )
        meta = runner.run(
            py_iwae,
            "worker_iwae.py",
            {
                **base,
                "phase": "meta",
                "label": "roofline + data",
                "data_dir": data_dir,
                "n_train_pool": cfg["n_train_pool"],
                "n_test": max(cfg["eval_images"], cfg["pythae_eval_images"], 64),
                "matmul_shapes": MATMUL_SHAPES,
                "matmul_s": cfg["matmul_s"],
                "step_rows": [b * k for k in cfg["ks"] for b in cfg["batches"]],
            },
        )
        pythae_meta = (
            runner.run(py_pythae, "worker_pythae.py", {**base, "phase": "meta"})
            if use_pythae
            else None
        )

        jobs = [
            {"layers": l, "k": k, "batch": b}
            for l in cfg["layers"]
            for k in cfg["ks"]
            for b in cfg["batches"]
        ]
        train_spec = {**base, "phase": "train", "timing": cfg["timing"]}
        train_ours, train_pythae = [], []
        # quick: all configurations in one worker (import time dominates); full: one per worker
        groups = [jobs] if args.quick else [[j] for j in jobs]
        for group in groups:
            label = "all" if len(group) > 1 else "L{layers} k={k} B={batch}".format(**group[0])
            ours = [
                {**j, "threads": meta["auto_threads"][str(j["batch"] * j["k"])]}
                if args.iwae_threads == "auto"
                else j
                for j in group
            ]
            r = runner.run(py_iwae, "worker_iwae.py", {**train_spec, "jobs": ours, "label": label})
            train_ours += worker_rows(r)
            if use_pythae:
                g1 = [j for j in group if j["layers"] == 1]
                if g1:
                    r = runner.run(
                        py_pythae, "worker_pythae.py", {**train_spec, "jobs": g1, "label": label}
                    )
                    train_pythae += worker_rows(r)

        # pythae with denormals flushed too, so that the comparison is honest both ways
        train_pythae_ftz, train_pythae_tuned = [], []
        if use_pythae:
            r = runner.run(
                py_pythae,
                "worker_pythae.py",
                {
                    **train_spec,
                    "jobs": [{"layers": 1, "k": 50, "batch": 20}],
                    "flush_denormal": True,
                    "label": "L1 k=50 B=20 flushed",
                },
            )
            train_pythae_ftz = worker_rows(r, flush_denormal=True)
            # and with freed memory kept for reuse as well, as iwae trains on the CPU
            r = runner.run(
                py_pythae,
                "worker_pythae.py",
                {
                    **train_spec,
                    "jobs": [{"layers": 1, "k": 50, "batch": 20}],
                    "flush_denormal": True,
                    "reuse_freed_memory": True,
                    "label": "L1 k=50 B=20 flushed, freed memory reused",
                },
            )
            train_pythae_tuned = worker_rows(r, flush_denormal=True, reuse_freed_memory=True)
        ftz = None
        if data_dir is not None:  # needs real MNIST: a model trained for a pass
            ftz = runner.run(
                py_iwae,
                "worker_iwae.py",
                {
                    **base,
                    "phase": "ftz",
                    "data_dir": data_dir,
                    "timing": cfg["timing"],
                    "n_train": 2000 if args.quick else None,
                    "label": "k=50 flushed / not",
                },
            )

        lockstep = runner.run(
            py_iwae,
            "worker_iwae.py",
            {
                **base,
                "phase": "lockstep",
                "ks": cfg["ks"],
                "threads": 1,
                "timing": cfg["timing"],
                "label": "8 models, 1 thread",
            },
        )
        grid = None
        if data_dir is not None:
            grid = runner.run(
                py_iwae,
                "worker_iwae.py",
                {
                    **base,
                    "phase": "grid",
                    "data_dir": data_dir,
                    "workers": 2,
                    "threads": 1,
                    "overrides": {"n_train": cfg["grid_n_train"], "eval_n": 64, "stage_nll_k": 0},
                    "eval_k": 64,
                    "n_test": 64,
                    "label": "table1 k=5 x 4 seeds",
                },
            )

        groups = None
        if data_dir is not None:  # trains on real MNIST, as iwae reproduce does
            groups = runner.run(
                py_iwae,
                "worker_iwae.py",
                {
                    **base,
                    "phase": "groups",
                    "device": args.device,
                    "data_dir": data_dir,
                    "groups": GROUPS,
                    "n_train": cfg["groups_n_train"],
                    "epochs": cfg["groups_epochs"],
                    "label": f"lockstep groups, {args.device}",
                },
            )

        eval_ours = []
        for layers in cfg["layers"]:
            r = runner.run(
                py_iwae,
                "worker_iwae.py",
                {
                    **base,
                    "phase": "eval",
                    "layers": layers,
                    "k": EVAL_K,
                    "n_images": cfg["eval_images"],
                    "warmup_images": 6,
                    "label": f"L{layers} k={EVAL_K} n={cfg['eval_images']}",
                },
            )
            eval_ours.append(r)
        eval_pythae = None
        if use_pythae:
            eval_pythae = runner.run(
                py_pythae,
                "worker_pythae.py",
                {
                    **base,
                    "phase": "eval",
                    "k": EVAL_K,
                    "n_images": cfg["pythae_eval_images"],
                    "batch_sizes": cfg["pythae_eval_batch_sizes"],
                    "label": f"L1 k={EVAL_K} n={cfg['pythae_eval_images']}",
                },
            )

        correctness = runner.run(
            py_iwae,
            "worker_iwae.py",
            {
                **base,
                "phase": "correctness",
                "k": EVAL_K,
                "n_images": cfg["correct_images"],
                "layers": cfg["layers"],
                "train_steps": cfg["correct_train_steps"],
                "max_rows": cfg["correct_max_rows"],
                "tolerance_nats": TOLERANCE_NATS,
                "label": "vs float64 reference",
            },
        )

    # -- FLOPs and ratios ---------------------------------------------------------------
    presets = meta["presets"]

    def arch(layers):
        p_ = presets[str(layers)]
        return 784, p_["latent"], p_["hidden"]

    flops = {
        "train_per_example": {
            f"L{l}_k{k}": train_flops_per_example(*arch(l), k)
            for l in cfg["layers"]
            for k in cfg["ks"]
        },
        "eval_per_sample": {
            f"L{l}_k{EVAL_K}": eval_flops_per_sample(*arch(l), EVAL_K) for l in cfg["layers"]
        },
    }
    peak = max(m["gflops_fp32"] for m in meta["matmul"]) * 1e9
    for r in train_ours + train_pythae:
        f = flops["train_per_example"][f"L{r['layers']}_k{r['k']}"]
        r["gflops"] = r["examples_per_s"] * f / 1e9
        r["roofline_fraction"] = r["examples_per_s"] * f / peak
    for r in eval_ours + ([eval_pythae] if eval_pythae else []):
        f = flops["eval_per_sample"][f"L{r['layers']}_k{EVAL_K}"]
        r["gflops"] = r["images_per_s"] * EVAL_K * f / 1e9
        r["roofline_fraction"] = r["images_per_s"] * EVAL_K * f / peak

    def find(rows, layers, k, batch):
        for r in rows:
            if (r["layers"], r["k"], r["batch"]) == (layers, k, batch):
                return r
        return None

    def ratio(a, b):
        return a / b if a is not None and b else None

    ours50, ours5 = find(train_ours, 1, 50, 20), find(train_ours, 1, 5, 20)
    py50, py5 = find(train_pythae, 1, 50, 20), find(train_pythae, 1, 5, 20)
    ev1 = next(r for r in eval_ours if r["layers"] == 1)
    result = {
        "train_vs_pythae": ratio(ours50["examples_per_s"], py50 and py50["examples_per_s"]),
        "train_k5_vs_pythae": ratio(ours5["examples_per_s"], py5 and py5["examples_per_s"]),
        "eval_vs_pythae": ratio(ev1["images_per_s"], eval_pythae and eval_pythae["images_per_s"]),
        "train_vs_pythae_ftz": ratio(
            ours50["examples_per_s"], train_pythae_ftz and train_pythae_ftz[0]["examples_per_s"]
        ),
        "train_vs_pythae_tuned": ratio(
            ours50["examples_per_s"], train_pythae_tuned and train_pythae_tuned[0]["examples_per_s"]
        ),
        "ftz_speedup_k50": ftz and ftz["ftz_speedup_k50"],
        "lockstep_speedup": {k: v["lockstep_speedup"] for k, v in lockstep["by_k"].items()},
        "grid_speedup": grid and grid["grid_speedup"],
        "train_roofline_fraction": ours50["roofline_fraction"],
        "eval_roofline_fraction": ev1["roofline_fraction"],
        "correctness_passed": correctness["passed"],
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mode": "quick" if args.quick else "full",
            "torch": meta["torch"],
            "python": platform.python_version(),
            "iwae_file": meta["iwae_file"],
            "pythae": pythae_meta and pythae_meta["pythae"],
            "pythae_torch": pythae_meta and pythae_meta["torch"],
            "cpu": cpu_model(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "threads": threads,
            "iwae_train_threads": args.iwae_threads,
            "iwae_malloc": args.iwae_malloc,
            "device": args.device,
            "torch_threads_in_workers": meta["torch_threads"],
            "data": meta["data"],
            "load_average_at_start": list(os.getloadavg()),
            "total_seconds": None,
        },
        "roofline": {"peak_gflops_fp32": peak / 1e9, "matmul": meta["matmul"]},
        "flops": {
            **flops,
            "formula": {
                "train_per_example": (
                    "sum over Linear layers of 2*d_in*d_out*(2 + [input needs grad]) "
                    "* (k if the layer runs per sample else 1)"
                ),
                "eval_per_sample": "sum over per-sample Linear layers of 2*d_in*d_out "
                "+ (1/k) * sum over per-example Linear layers of 2*d_in*d_out",
            },
        },
        "ftz": ftz,
        "lockstep": lockstep,
        "grid": grid,
        "groups": groups,
        "train": {
            "iwae": train_ours,
            "pythae": train_pythae or None,
            "pythae_flushed": train_pythae_ftz or None,
            "pythae_tuned": train_pythae_tuned or None,
            "note": (
                "iwae: iwae.train.train_step with iwae.train.adam, as iwae.train.train runs it; "
                "pythae: BaseTrainer.train_step's body"
            ),
        },
        "eval": {"iwae": eval_ours, "pythae": eval_pythae, "k": EVAL_K},
        "correctness": correctness,
        "memory_by_phase": [],
    }
    for r in train_ours:
        result["memory_by_phase"].append(
            {"what": f"iwae train L{r['layers']} k={r['k']} B={r['batch']}", **r["memory"]}
        )
    for r in train_pythae:
        result["memory_by_phase"].append(
            {"what": f"pythae train L1 k={r['k']} B={r['batch']}", **r["memory"]}
        )
    for r in eval_ours:
        result["memory_by_phase"].append(
            {"what": f"iwae eval L{r['layers']} k={EVAL_K}", **r["memory"]}
        )
    if eval_pythae:
        result["memory_by_phase"].append(
            {"what": f"pythae eval L1 k={EVAL_K}", **eval_pythae["memory"]}
        )
    result["meta"]["total_seconds"] = round(time.perf_counter() - started, 1)

    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['meta']['total_seconds']} s")
    return 0 if correctness["passed"] else 1


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(r: dict) -> None:
    m = r["meta"]
    print(
        f"\n{m['date']}  torch {m['torch']}  {m['cpu_model']}  threads={m['threads']}  "
        f"data={m['data'][:40]}"
    )
    print(
        f"matmul fp32 peak {r['roofline']['peak_gflops_fp32']:.1f} GFLOP/s; "
        + ", ".join(
            f"{x['name'].split(' (')[0]} {x['gflops_fp32']:.0f}" for x in r["roofline"]["matmul"]
        )
    )
    print(
        "\nTRAINING (IWAE, Adam)       iwae ex/s   pythae ex/s   ratio   iwae GFLOP/s  roofline  "
        "peak RSS MiB (iwae/pythae)  threads (iwae/pythae)  iwae precision"
    )
    py = {(x["layers"], x["k"], x["batch"]): x for x in (r["train"]["pythae"] or [])}
    for x in r["train"]["iwae"]:
        y = py.get((x["layers"], x["k"], x["batch"]))
        ratio = _fmt(y and x["examples_per_s"] / y["examples_per_s"])
        rss_pythae = _fmt(y and y["memory"]["peak_rss_mib"], ".0f")
        print(
            f"  L{x['layers']} k={x['k']:<3} batch={x['batch']:<4}      "
            f"{x['examples_per_s']:9.0f}   {_fmt(y and y['examples_per_s'], '11.0f'):>11}   "
            f"{ratio:>5}   {x['gflops']:10.1f}   {x['roofline_fraction']:7.1%}   "
            f"{x['memory']['peak_rss_mib']:.0f}/{rss_pythae:<9}  "
            f"{x.get('threads', '-')}/{y.get('threads', '-') if y else '-':<20} "
            f"{x.get('precision', 'fp32')}"
        )
    print(
        f"\nEVALUATION (k={r['eval']['k']})      iwae img/s  (10k in s)   "
        "pythae img/s (10k in s)   ratio   roofline  peak RSS MiB"
    )
    pe = r["eval"]["pythae"]
    for x in r["eval"]["iwae"]:
        y = pe if x["layers"] == 1 else None
        ratio = _fmt(y and x["images_per_s"] / y["images_per_s"])
        rss_pythae = _fmt(y and y["memory"]["peak_rss_mib"], ".0f")
        print(
            f"  L{x['layers']}                      {x['images_per_s']:8.1f}  "
            f"({x['seconds_per_10k']:7.0f})   {_fmt(y and y['images_per_s'], '10.1f'):>10} "
            f"({_fmt(y and y['seconds_per_10k'], '7.0f'):>7})    {ratio:>5}   "
            f"{x['roofline_fraction']:7.1%}   {x['memory']['peak_rss_mib']:.0f}/{rss_pythae}"
        )
    c = r["correctness"]
    print(
        "\nCORRECTNESS (fast vs float64 torch.distributions reference, same eps, tol "
        f"{c['tolerance_nats']:g} nats): {'PASS' if c['passed'] else 'FAIL'}"
    )
    for x in c["checks"]:
        d = x["max_abs_diff_per_example"]
        print(
            f"  L{x['layers']} max_rows={x['max_rows'] or 'default'}: NLL {x['nll_fast']:.4f} vs "
            f"{x['nll_reference']:.4f}; max |diff| log_px {d['log_px']:.1e}, iwae64 "
            f"{d['small']:.1e}, elbo {d['elbo']:.1e}"
        )
    f = r.get("ftz")
    if f:
        print(
            f"\nDENORMALS (IWAE k=50, L1, batch 20, after one pass of k=5 over {f['n_train']} "
            f"MNIST images; {f['denormal_values_in_state']} denormal values in weights and Adam "
            f"state): flushed {f['examples_per_s_flushed']:.0f} ex/s, not flushed "
            f"{f['examples_per_s_not_flushed']:.0f} ex/s, speed-up {f['ftz_speedup_k50']:.2f}x"
        )
    ls = r.get("lockstep")
    if ls:
        print(
            f"\nLOCKSTEP ({ls['models']} models: VAE and IWAE x 4 seeds, 1 layer, batch "
            f"{ls['batch']}, {ls['threads']} thread): model-steps/s single / lockstep / ratio"
        )
        for k, v in ls["by_k"].items():
            print(
                f"  k={k:<3} {v['single_model_steps_per_s']:8.0f} "
                f"{v['lockstep_model_steps_per_s']:8.0f}   {v['lockstep_speedup']:.2f}x"
            )
    g = r.get("grid")
    if g:
        print(
            f"GRID (table1 MNIST 1 layer k=5 x 4 seeds, n_train={g['overrides']['n_train']}, "
            f"{g['workers']} workers): one run per process "
            f"{g['seconds']['one_run_per_process']:.1f} s, "
            f"lockstep {g['seconds']['lockstep']:.1f} s, {g['grid_speedup']:.2f}x"
        )
    print_groups(r.get("groups"))
    pf = (r["train"].get("pythae_flushed") or [None])[0]
    if pf:
        print(f"pythae L1 k=50 batch=20 with denormals flushed: {pf['examples_per_s']:.0f} ex/s")
    pt = (r["train"].get("pythae_tuned") or [None])[0]
    if pt:
        print(
            f"pythae L1 k=50 batch=20 flushed, freed memory reused: {pt['examples_per_s']:.0f} ex/s"
        )
    print(
        "\nRATIOS: "
        + ", ".join(
            f"{k}={_fmt(r[k], '.3f')}"
            for k in (
                "train_vs_pythae",
                "train_vs_pythae_ftz",
                "train_vs_pythae_tuned",
                "train_k5_vs_pythae",
                "eval_vs_pythae",
                "ftz_speedup_k50",
                "train_roofline_fraction",
                "eval_roofline_fraction",
            )
        )
    )


def print_groups(gr: dict | None) -> None:
    """The groups phase's rows: group and model steps per second on its device."""
    if not gr:
        return
    if "skipped" in gr:
        print(f"\nGROUPS: skipped ({gr['skipped']})")
        return
    print(
        f"\nGROUPS (lockstep, iwae.train.train_lockstep on {gr['gpu'] or gr['device']}, "
        f"{gr['n_train']} MNIST images, batch {gr['batch']}, pass {gr['epochs']} timed): "
        "group steps/s, model steps/s"
    )
    for x in gr["rows"]:
        graphs = "graphs" if x["cuda_graphs"] else "eager"
        print(
            f"  L{x['layers']} k={x['k']:<3} group of {x['group']} ({graphs:<6}) "
            f"{x['group_steps_per_s']:9.1f} {x['model_steps_per_s']:9.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
