"""Put back the OMNIGLOT k=50 runs trained on a lent H100 (2026-11-26, bench/gpu.sh) whose
run files, all but the checkpoints, were lost on the way back (the device tool re-syncs the
working tree before each call: the second call deleted every file git does not ignore, and
kept the ignored checkpoints; see results/README.md).

For each run: config.json as the runner writes it (the Table 1 grid at --stages 5, the GPU
run's checkpoint_minutes 1.0, this machine's data directory); for a run whose checkpoint
stands at the end of its schedule (121 passes), also model.safetensors (the checkpoint's
weights) and summary.json (what the checkpoint says: passes and training seconds on the
GPU), with ``recovered`` saying what is missing: metrics.jsonl (the per-pass bounds and the
stage-end test_nll_subset) is lost. Unfinished runs continue from their checkpoints.

    python results/table1-omniglot-s5/recover_gpu_runs.py
"""

from pathlib import Path

import torch

from iwae.data import load_dataset
from iwae.experiments import grid
from iwae.rundir import CONFIG_FILE, SUMMARY_FILE, WEIGHTS_FILE, checkpoint_meta, save_weights, write_json
from iwae.train import TrainConfig, adam, load_checkpoint
from iwae.model import VAE

HERE = Path(__file__).parent
GPU = {"device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130"}


def main() -> None:
    runs = {r.name: r for r in grid("table1", 5)}
    dataset = load_dataset("omniglot", "../shared/data")
    for d in sorted((HERE / "runs").iterdir()):
        config = TrainConfig(**dict(runs[d.name].config, data_dir="../shared/data", checkpoint_minutes=1.0))
        config = config.for_data(dataset)
        write_json(d / CONFIG_FILE, config.to_dict())
        progress = checkpoint_meta(d / "checkpoint.safetensors")["progress"]
        if progress["passes"] < config.total_passes:
            print(f"{d.name}: unfinished at pass {progress['passes']} step {progress['step']}; config.json written")
            continue
        model = VAE(config.model_config)
        generator = torch.Generator()
        load_checkpoint(d / "checkpoint.safetensors", model, adam(model.parameters()), generator)
        save_weights(model, d / WEIGHTS_FILE)
        write_json(d / SUMMARY_FILE, {
            "passes": progress["passes"], "train_seconds": progress["total_seconds"], "final_train_bound": None,
            "final_test_iwae64": None, "n_train": int(dataset.train.shape[0]), **GPU, "processes": 1,
            "recovered": "trained on the GPU; metrics.jsonl lost on the way back (weights from the pass-121 checkpoint)"})
        print(f"{d.name}: finished ({progress['passes']} passes, {progress['total_seconds']:.0f} s on the GPU)")


if __name__ == "__main__":
    main()
