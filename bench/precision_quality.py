"""Is bf16 training as good as fp32? Paired test NLL of runs trained both ways.

    python bench/precision_quality.py RUNS_DIR [--out FILE.json]

``RUNS_DIR`` holds run directories (``scripts/precision.sh``) that are the same
configuration trained with ``--precision fp32`` and with ``--precision bf16``, for one or
more seeds, each evaluated by ``iwae evaluate`` (per-image L_k in
``evaluation.safetensors``). For each seed the difference NLL(bf16) − NLL(fp32) is taken
image by image over the test images both saw (mean ± its paired standard error); over the
seeds, the mean of those differences ± the standard error of the seeds' differences
(std / sqrt(seeds)), which holds the noise of training itself. bf16 is "within noise" when
the mean lies within 2 of those standard errors of 0. Training seconds give the speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from iwae.report.claims import paired_images  # noqa: E402
from iwae.rundir import (  # noqa: E402
    CONFIG_FILE,
    EVALUATION_FILE,
    SUMMARY_FILE,
    read_evaluation_images,
    read_json,
)

PRECISIONS = ("fp32", "bf16")


def _key(config: dict) -> str:
    """The configuration without its precision and seed: runs to be paired share it."""
    ignored = {"precision", "precision_requested", "seed"}
    return json.dumps({k: v for k, v in config.items() if k not in ignored}, sort_keys=True)


def read_pairs(runs_dir: Path) -> dict[int, dict[str, Path]]:
    """``{seed: {"fp32": run, "bf16": run}}`` of the evaluated runs in ``runs_dir``; an error
    when they are not one configuration."""
    pairs: dict[int, dict[str, Path]] = {}
    keys = set()
    for path in sorted(p for p in runs_dir.iterdir() if (p / EVALUATION_FILE).exists()):
        config = read_json(path / CONFIG_FILE)
        precision = config.get("precision", "fp32")
        if precision not in PRECISIONS:
            continue
        keys.add(_key(config))
        pairs.setdefault(int(config.get("seed", 0)), {})[precision] = path
    if len(keys) > 1:
        raise SystemExit(f"{runs_dir}: the runs are not one configuration trained two ways")
    return {s: p for s, p in sorted(pairs.items()) if len(p) == 2}


def paired_difference(fp32: Path, bf16: Path) -> dict:
    """NLL(bf16) − NLL(fp32) over the test images both runs were evaluated on."""
    a, b = (read_evaluation_images(p) for p in (fp32, bf16))
    # log p_fp32 - log p_bf16 = NLL_bf16 - NLL_fp32
    d = paired_images(*((t["test_index"].numpy(), t["log_px"].numpy()) for t in (b, a)))
    seconds = [
        (read_json(p / SUMMARY_FILE, required=False) or {}).get("train_seconds")
        for p in (fp32, bf16)
    ]
    return {
        "fp32_run": fp32.name,
        "bf16_run": bf16.name,
        "fp32_nll": float(read_json(fp32 / EVALUATION_FILE)["nll"]),
        "bf16_nll": float(read_json(bf16 / EVALUATION_FILE)["nll"]),
        "images": d.n,
        "diff": d.diff,
        "diff_se": d.se,
        "fp32_train_seconds": seconds[0],
        "bf16_train_seconds": seconds[1],
        "bf16_speedup": seconds[0] / seconds[1] if all(seconds) else None,
    }


def summarize(per_seed: dict[int, dict]) -> dict:
    """The mean difference over seeds with the seeds' standard error, and the verdict."""
    diffs = [r["diff"] for r in per_seed.values()]
    n = len(diffs)
    se = float(np.std(diffs, ddof=1) / math.sqrt(n)) if n > 1 else None
    mean = float(np.mean(diffs))
    within = None if se is None else abs(mean) <= 2 * se
    return {
        "seeds": n,
        "diff": mean,
        "diff_se_over_seeds": se,
        "diff_se_paired_images": float(
            math.sqrt(sum(r["diff_se"] ** 2 for r in per_seed.values())) / n
        ),
        "within_noise": within,
        "per_seed": {str(s): r for s, r in per_seed.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", help="a directory of runs trained in fp32 and in bf16")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    pairs = read_pairs(Path(args.runs_dir))
    if not pairs:
        p.error(f"{args.runs_dir}: no seed has both an evaluated fp32 and bf16 run")
    result = summarize({s: paired_difference(r["fp32"], r["bf16"]) for s, r in pairs.items()})
    print("| seed | fp32 NLL | bf16 NLL | bf16 − fp32 (paired) | images | bf16 speed-up |")
    print("|---|---|---|---|---|---|")
    for seed, r in result["per_seed"].items():
        speedup = f"{r['bf16_speedup']:.2f}x" if r["bf16_speedup"] else "—"
        print(
            f"| {seed} | {r['fp32_nll']:.2f} | {r['bf16_nll']:.2f} | {r['diff']:+.3f} ± "
            f"{r['diff_se']:.3f} | {r['images']:,} | {speedup} |"
        )
    se = result["diff_se_over_seeds"]
    verdict = {True: "within noise", False: "NOT within noise", None: "one seed: no verdict"}
    print(
        f"\nmean over {result['seeds']} seed(s): {result['diff']:+.3f} nats"
        + (f" ± {se:.3f} (seeds)" if se is not None else "")
        + f", ± {result['diff_se_paired_images']:.3f} (images): "
        + verdict[result["within_noise"]]
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
