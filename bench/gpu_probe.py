"""Training rate of one lockstep group on this machine's device: model-steps per second.

    python bench/gpu_probe.py --layers 2 --k 50 --group 2 [--n-train 4000] [--epochs 3] [--cuda-graphs auto]

Trains ``--group`` runs (IWAE and VAE alternating, seeds 0, 1, ...) of Burda et al.'s
architecture side by side (:func:`iwae.train.train_lockstep`) on the first ``--n-train``
MNIST training images for ``--epochs`` passes at batch 20, and prints one JSON line with
the last pass's group steps per second (the first pass holds the CUDA-graph capture and
warm-up). Several probes started at once measure how processes share one GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--group", type=int, default=2)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--cuda-graphs", default="auto")
    p.add_argument("--device", default=None)
    a = p.parse_args()

    import torch

    from iwae.train import TrainConfig, train_lockstep

    configs = [
        TrainConfig(
            dataset=a.dataset,
            layers=a.layers,
            objective=("iwae", "vae")[g % 2],
            k=a.k,
            seed=g // 2,
            stages=None,
            epochs=a.epochs,
            n_train=a.n_train,
            eval_every=10_000,
            stage_nll_k=0,
        )
        for g in range(a.group)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"run{g}" for g in range(a.group)]
        started = time.perf_counter()
        summaries = train_lockstep(
            configs, outs, progress=False, device=a.device, cuda_graphs=a.cuda_graphs
        )
        wall = time.perf_counter() - started
        last = [json.loads(line) for line in open(outs[0] / "metrics.jsonl")][-1]
    steps = -(-a.n_train // 20)
    print(
        json.dumps(
            {
                "layers": a.layers,
                "k": a.k,
                "group": a.group,
                "dataset": a.dataset,
                "device": summaries[0].get("device"),
                "cuda_graphs": summaries[0].get("cuda_graphs"),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "group_steps_per_s": round(steps / last["seconds"], 1),
                "model_steps_per_s": round(a.group * steps / last["seconds"], 1),
                "last_pass_s": round(last["seconds"], 3),
                "wall_s": round(wall, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
