"""Benchmark phases for pythae's IWAE, run with bench/.venv-pythae/bin/python.

Imports only torch, numpy and pythae (never iwae). The model is pythae.models.IWAE
with IWAEConfig(number_samples=k, reconstruction_loss="bce") and an encoder/decoder of
Burda et al.'s 1-layer architecture: 784-200-200-(50 mean, 50 log-std) with tanh, and
50-200-200-784 with a sigmoid output (pythae's "bce" loss takes probabilities). pythae's
encoder returns the log-variance, here 2 * (a linear layer): sigma = exp(linear) as in
iwae's "exp" scale. Initialization as in iwae: Glorot-uniform weights, zero biases.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import time_course, time_steps, worker_main  # noqa: E402
from pythae.data.datasets import DatasetOutput  # noqa: E402
from pythae.models import IWAE, IWAEConfig  # noqa: E402
from pythae.models.base.base_utils import ModelOutput  # noqa: E402
from pythae.models.nn import BaseDecoder, BaseEncoder  # noqa: E402


class BurdaEncoder(BaseEncoder):
    def __init__(self, x_dim=784, hidden=(200, 200), latent=50):
        super().__init__()
        layers, d = [], x_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.Tanh()]
            d = h
        self.net = nn.Sequential(*layers)
        self.mean = nn.Linear(d, latent)
        self.log_std = nn.Linear(d, latent)

    def forward(self, x):
        a = self.net(x.reshape(x.shape[0], -1))
        return ModelOutput(embedding=self.mean(a), log_covariance=2.0 * self.log_std(a))


class BurdaDecoder(BaseDecoder):
    def __init__(self, x_dim=784, hidden=(200, 200), latent=50):
        super().__init__()
        layers, d = [], latent
        for h in hidden:
            layers += [nn.Linear(d, h), nn.Tanh()]
            d = h
        self.net = nn.Sequential(*layers, nn.Linear(d, x_dim))

    def forward(self, z):
        return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))


def build(k: int, pixel_mean: torch.Tensor, seed: int = 0) -> IWAE:
    torch.manual_seed(seed)
    config = IWAEConfig(
        input_dim=(784,), latent_dim=50, reconstruction_loss="bce", number_samples=k
    )
    model = IWAE(config, encoder=BurdaEncoder(), decoder=BurdaDecoder())
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        model.decoder.net[-1].bias.copy_(torch.logit(pixel_mean.clamp(0.001, 0.999)))
    return model


def load_data(spec):
    d = np.load(spec["data_file"])
    return (
        torch.from_numpy(d["train"]),
        torch.from_numpy(d["test"]),
        torch.from_numpy(d["pixel_mean"]),
    )


def phase_meta(spec) -> dict:
    return {"torch": torch.__version__, "pythae": md.version("pythae")}


def _train_step(model, optimizer, train_x, batch: int):
    """BaseTrainer.train_step's body on the next ``batch`` images of a pool re-binarized and
    re-shuffled whenever it runs out, as a function of no arguments."""
    n = train_x.shape[0]
    state = {"i": n, "xb_all": None, "epoch_loss": 0.0}

    def step():
        if state["i"] + batch > n:
            state["xb_all"] = torch.bernoulli(train_x[torch.randperm(n)])
            state["i"] = 0
        xb = state["xb_all"][state["i"] : state["i"] + batch]
        state["i"] += batch
        inputs = DatasetOutput(data=xb)
        model_output = model(inputs, epoch=1, dataset_size=n, uses_ddp=False)
        loss = model_output.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["epoch_loss"] += loss.item()
        if state["epoch_loss"] != state["epoch_loss"]:
            raise ArithmeticError("NaN detected in train loss")

    return step


def _job_step(job: dict, train_x, pixel_mean):
    """The training step (_train_step) of a fresh model for ``job`` (its k and batch), with
    Adam as iwae trains (lr 1e-3, betas (0.9, 0.999), eps 1e-4)."""
    model = build(job["k"], pixel_mean)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-4)
    model.train()
    return _train_step(model, optimizer, train_x, job["batch"])


def phase_train(spec) -> dict:
    """pythae's BaseTrainer.train_step, per batch: model(inputs, epoch=, dataset_size=,
    uses_ddp=), then _optimizers_step (zero_grad, loss.backward, optimizer.step), then
    epoch_loss += loss.item() and its NaN check. The DataLoader is replaced by slicing a
    re-binarized, re-shuffled pool (the same as for iwae), which only favours pythae."""
    train_x, _, pixel_mean = load_data(spec)
    t = spec["timing"]
    results = []
    for job in spec["jobs"]:
        if job["layers"] != 1:
            continue  # pythae's IWAE has one stochastic layer
        batch = job["batch"]
        step = _job_step(job, train_x, pixel_mean)
        timing = time_steps(step, t["warmup_steps"], t["warmup_s"], t["repeats"], t["min_s"])
        results.append(
            {
                **job,
                "examples_per_s": timing["median_steps_per_s"] * batch,
                "best_examples_per_s": timing["best_steps_per_s"] * batch,
                "timing": timing,
                "threads": torch.get_num_threads(),
            }
        )
    return {"results": results}


def phase_course(spec) -> dict:
    """The train phase's step for ``spec["job"]`` over ``spec["seconds"]`` of training from
    initialization, per window of ``spec["window_s"]`` seconds (_common.time_course), with
    denormals flushed or not as the spec says (worker_main)."""
    train_x, _, pixel_mean = load_data(spec)
    job = spec["job"]
    step = _job_step(job, train_x, pixel_mean)
    return {**job, **time_course(step, spec["seconds"], spec["window_s"])}


def phase_eval(spec) -> dict:
    """pythae's VAE.get_nll(data, n_samples=k, batch_size=b): one image at a time, k/b
    batches of b samples, each re-encoding the image. Called as the API is (pythae does
    not disable autograd in it) and also under torch.no_grad(); every batch size in
    spec["batch_sizes"] is timed, and the fastest variant is the one compared."""
    _, test_x, pixel_mean = load_data(spec)
    model = build(1, pixel_mean)
    model.eval()
    k, n = spec["k"], spec["n_images"]
    x = test_x[:n]
    variants = []
    for b in spec["batch_sizes"]:
        for no_grad in (False, True):
            ctx = torch.no_grad() if no_grad else torch.enable_grad()
            with ctx:
                torch.manual_seed(1)
                model.get_nll(test_x[:1], n_samples=k, batch_size=b)  # warm-up
                torch.manual_seed(0)
                t0 = time.perf_counter()
                nll = model.get_nll(x, n_samples=k, batch_size=b)
                dt = time.perf_counter() - t0
            variants.append(
                {
                    "batch_size": b,
                    "no_grad": no_grad,
                    "seconds": dt,
                    "images_per_s": n / dt,
                    "seconds_per_10k": 10000 * dt / n,
                    "mean_log_px": float(nll),
                }
            )
    best = max(variants, key=lambda v: v["images_per_s"])
    return {
        "layers": 1,
        "k": k,
        "n_images": n,
        "variants": variants,
        "best": best,
        "images_per_s": best["images_per_s"],
        "seconds_per_10k": best["seconds_per_10k"],
    }


if __name__ == "__main__":
    worker_main(
        {"meta": phase_meta, "train": phase_train, "eval": phase_eval, "course": phase_course}
    )
