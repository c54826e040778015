"""What a training run reports as it goes: the metrics line of each pass with the test
bounds due after it, TensorBoard (scalars per pass; active units and samples per stage),
and the progress bar of each stage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from iwae.checkpoint import Progress
from iwae.model import VAE
from iwae.progress import progress_bar
from iwae.rundir import TENSORBOARD_DIR


def pass_record(p: int, stage: int, lr: float, state: Progress, seconds: float) -> dict:
    """The metrics line of pass ``p`` (before its test bounds are added)."""
    return {
        "pass": p + 1,
        "stage": stage,
        "lr": lr,
        "train_bound": state.bound_sum / max(state.good_examples, 1),
        "seconds": seconds,
        "skipped_steps": state.skipped,
    }


def test_bounds(model: VAE, test_x: torch.Tensor, curve_k: int | None, seed: int) -> dict:
    """IWAE-64 on the test subset; with ``curve_k`` also log p-hat(x) = L_curve_k and
    -KL(Q||P) = IWAE-64 - log p-hat(x) (Rainforth et al.'s learning curves)."""
    from iwae.evaluate import iwae_bound, log_weight_reductions  # evaluate reads runs

    if curve_k is None:
        return {"test_iwae64": iwae_bound(model, test_x, k=64, seed=seed)}
    model.eval()
    r = log_weight_reductions(model, test_x, curve_k, k_small=64, seed=seed)
    iwae64, log_px = r["small"].double().mean().item(), r["log_px"].double().mean().item()
    return {"test_iwae64": iwae64, "test_log_px": log_px, "test_neg_kl_q_p": iwae64 - log_px}


def stage_nll(model: VAE, test_x: torch.Tensor, k: int, seed: int) -> dict:
    """The test NLL -mean L_k on the logged test subset, for the budget ladder of the report."""
    from iwae.evaluate import iwae_bound

    return {
        "test_nll_subset": -iwae_bound(model, test_x, k=k, seed=seed),
        "test_nll_subset_k": k,
        "test_nll_subset_n": int(test_x.shape[0]),
    }


class NoBoard:
    """A TensorBoard writer that writes nothing (torchrun ranks other than 0; no tensorboardX)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def tensorboard(out: Path, purge_step: int | None):
    """The TensorBoard writer of run directory ``out`` (``purge_step``: a resumed run's first
    pass; events logged from there on before the interruption are dropped)."""
    try:
        from tensorboardX import SummaryWriter
    except ModuleNotFoundError:
        return NoBoard()
    return SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=purge_step)


def log_pass(board, record: dict) -> None:
    """The scalars of a pass's metrics line."""
    for key in ("train_bound", "test_iwae64", "test_nll_subset", "lr", "seconds", "skipped_steps"):
        if key in record:
            board.add_scalar(key, record[key], record["pass"])


def log_stage(board, model: VAE, test_x: torch.Tensor, passes: int, image_shape=None) -> None:
    """At a stage end: the active units of each stochastic layer and 64 samples."""
    if isinstance(board, NoBoard):
        return
    from iwae.data import tile_images
    from iwae.evaluate import active_units

    model.eval()
    for layer, count in enumerate(active_units(model, test_x)):
        board.add_scalar(f"active_units/layer{layer + 1}", count, passes)
    generator = torch.Generator(device=test_x.device).manual_seed(0)
    # E[x | h] in [0, 1] (a Gaussian's mean may stray outside)
    images = model.sample_images(64, generator).clamp(0.0, 1.0).cpu().numpy()
    board.add_image("samples", tile_images(images, shape=image_shape), passes, dataformats="HW")
    board.flush()


def stage_bar(total: int, enabled: bool, config, objective, stage: int, lr: float):
    """The progress bar of a stage of ``config``'s run (training ``objective``) at rate
    ``lr``: ``total`` steps."""
    where = f"stage {stage + 1}/{config.stages}" if config.stages else "constant rate"
    desc = f"{objective} {where} lr={lr:.2e}"
    return progress_bar(total, desc, "step", enabled=enabled, mininterval=0.5)
