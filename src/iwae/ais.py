"""Annealed importance sampling (AIS) and bidirectional Monte Carlo (BDMC) bounds on log p(x).

AIS (Neal 2001), as Wu et al. (2017, "On the quantitative analysis of decoder-based
generative models") use it for decoder-based models: for one image x and the whole latent
stack h = (h_1..h_L), anneal from a normalized initial density f_0(h) to the unnormalized
posterior f_T(h) = p(x, h) along the geometric path

    f_t(h) = f_0(h)^(1 - beta_t) p(x, h)^beta_t,   0 = beta_0 < beta_1 < ... < beta_T = 1,

with f_0 = q(h | x) (the encoder, ``init="q"``) or the prior p(h) (``init="prior"``). A
chain draws h_0 ~ f_0 and, for t = 1..T, adds to its log-weight

    log f_t(h_{t-1}) - log f_{t-1}(h_{t-1})
        = (beta_t - beta_{t-1}) (log p(x, h_{t-1}) - log f_0(h_{t-1}))

and then moves h_{t-1} -> h_t with an HMC transition that leaves f_t invariant (the last
move, at t = T, changes no weight and is skipped). E[w] = p(x), so over C chains

    log p-hat(x) = log (1/C) sum_c w_c = :func:`iwae.bounds.iwae` of the [C, B] log-weights

is a stochastic lower bound: E[log p-hat(x)] <= log p(x) (Jensen), tighter as T grows.
With T = 1 and f_0 = q it is the importance-sampling estimate L_C on the same draws.

Reverse AIS (Grosse et al. 2015, 2016) runs the same path backwards from an exact sample of
the posterior, h_T ~ p(h | x): for t = T..1 it adds log f_{t-1}(h_t) - log f_t(h_t) and moves
with a transition that leaves f_{t-1} invariant. E[w_rev] = 1 / p(x), so -log (1/C) sum w_rev
is a stochastic *upper* bound on log p(x). Exact posterior samples exist for data simulated
from the model (:func:`simulate`: h ~ p(h), x ~ p(x | h)), so on such data the two bound the
truth from both sides (bidirectional Monte Carlo, :func:`bdmc`).

Schedule: the sigmoid schedule of Wu et al. (2017) and Grosse et al. (2015),
beta_t = (s(delta (2t/T - 1)) - s(-delta)) / (s(delta) - s(-delta)), s the logistic sigmoid,
delta = 4 (:func:`sigmoid_schedule`): small steps near both ends of the path.

Transitions: Hamiltonian Monte Carlo (Neal 2011) with a unit mass matrix, ``leapfrog`` steps
of size epsilon, and a Metropolis accept/reject (:func:`hmc_transition`). Epsilon is one
number per image (shared by its chains) and adapted towards a target acceptance rate (0.65)
as Wu et al. do (their BDMC code): after each transition a running mean of the image's
acceptance probability (weight 0.1 on the newest) moves epsilon up by 2% if it is above the
target and down by 2% if below, within [1e-4, 0.5]. Every transition leaves its own f_t
invariant whatever its epsilon, and epsilon at step t depends only on the acceptances of the
transitions before t; strictly, letting the kernel depend on the chains' past makes the
estimator not exactly unbiased, a bias Wu et al. found negligible (and the tests against
quadrature here see none); ``adapt=False`` keeps epsilon fixed, for which AIS is exactly
unbiased.

Shapes: every state is one tensor [C, B, D] (C chains, B images, D = d_1 + ... + d_L, the
layers concatenated in the order h_1..h_L), every log-density and log-weight [C, B]. The
densities are the model's own (:meth:`iwae.latent.LatentVariableModel.log_joint`,
``log_q``, ``log_prior``); gradients with respect to h come from ``torch.autograd.grad``,
with the model's parameters frozen. Images are processed in chunks so that at most
``max_rows`` (chain, image) rows are alive at once: memory stays bounded for any C and T.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from iwae.bounds import iwae
from iwae.errors import IwaeError
from iwae.latent import LatentVariableModel
from iwae.progress import progress_bar

INITS = ("q", "prior")
#: (chain, image) rows alive at once (as :data:`iwae.evaluate.MAX_ROWS`)
MAX_ROWS = 4096
TARGET_ACCEPT = 0.65
STEP_SIZE_INIT = 0.05
STEP_SIZE_RANGE = (1e-4, 0.5)
ADAPT_RATE = 1.02  # epsilon is multiplied or divided by about this after each transition
ACCEPT_SMOOTHING = 0.9  # running mean of the acceptance: 0.9 old + 0.1 new


def sigmoid_schedule(steps: int, delta: float = 4.0) -> Tensor:
    """beta_0..beta_T (float64 [T+1]) of the sigmoid schedule (Grosse et al. 2015; Wu et al. 2017):

        beta_t = (s(delta (2t/T - 1)) - s(-delta)) / (s(delta) - s(-delta)),

    beta_0 = 0 and beta_T = 1 exactly, increasing, with small steps near both ends.
    ``steps`` = 1 gives [0, 1]."""
    if steps < 1:
        raise IwaeError(f"AIS needs at least 1 step, got {steps}")
    t = torch.arange(steps + 1, dtype=torch.float64)
    s = torch.sigmoid(delta * (2.0 * t / steps - 1.0))
    beta = (s - s[0]) / (s[-1] - s[0])
    beta[0], beta[-1] = 0.0, 1.0
    return beta


# -- HMC ------------------------------------------------------------------------------------


@dataclass
class Point:
    """A state h [C, B, D] with the target's log-density ``log_f`` [C, B] and its gradient
    ``grad`` [C, B, D] there, and ``parts``: tensors of the same leading shape [C, B, ...]
    that move with h (AIS keeps the two ends of the path there, see :class:`_Path`)."""

    h: Tensor
    log_f: Tensor
    grad: Tensor
    parts: tuple[Tensor, ...] = ()

    def where(self, take: Tensor, other: Point) -> Point:
        """Row by row: ``other`` where ``take`` [C, B] is true, else self."""

        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(take.reshape(*take.shape, *[1] * (a.dim() - 2)), b, a)

        return Point(
            pick(self.h, other.h),
            pick(self.log_f, other.log_f),
            pick(self.grad, other.grad),
            tuple(pick(a, b) for a, b in zip(self.parts, other.parts)),
        )


#: evaluate(h [C, B, D]) -> the Point at h (its log-density and gradient under the target)
Evaluate = Callable[[Tensor], Point]


def leapfrog(
    start: Point, momentum: Tensor, evaluate: Evaluate, step_size: Tensor, steps: int
) -> tuple[Point, Tensor]:
    """``steps`` leapfrog steps of size ``step_size`` (broadcast against [C, B, D]) for the
    Hamiltonian H(h, p) = -log f(h) + |p|^2 / 2:

        p <- p + (eps/2) grad log f(h);
        (h <- h + eps p;  p <- p + eps grad log f(h)) x steps, the last half

    ``steps`` evaluations of ``evaluate``; returns the end point and momentum."""
    p = momentum + 0.5 * step_size * start.grad
    point = start
    for i in range(steps):
        point = evaluate(point.h + step_size * p)
        p = p + (step_size if i < steps - 1 else 0.5 * step_size) * point.grad
    return point, p


def hmc_transition(
    start: Point,
    evaluate: Evaluate,
    step_size: Tensor,
    steps: int,
    generator: torch.Generator | None = None,
) -> tuple[Point, Tensor]:
    """One HMC transition (unit mass, ``steps`` leapfrog steps of size ``step_size``), which
    leaves f = exp(log f) invariant: draw p ~ N(0, I), integrate, accept the end point with
    probability min(1, exp(H(start) - H(end))); an end with a non-finite density (even +inf),
    gradient or momentum is rejected.

    Returns the new point (the start where rejected) and the acceptance probability [C, B]."""
    momentum = torch.randn(
        start.h.shape, dtype=start.h.dtype, device=start.h.device, generator=generator
    )
    end, p_end = leapfrog(start, momentum, evaluate, step_size, steps)
    h_start = -start.log_f + 0.5 * momentum.square().sum(-1)
    h_end = -end.log_f + 0.5 * p_end.square().sum(-1)
    log_accept = (h_start - h_end).clamp(max=0.0)
    finite = (
        torch.isfinite(end.log_f) & torch.isfinite(end.grad).all(-1) & torch.isfinite(p_end).all(-1)
    )
    log_accept = torch.where(finite & torch.isfinite(log_accept), log_accept, -math.inf)
    u = torch.rand(
        log_accept.shape, dtype=log_accept.dtype, device=log_accept.device, generator=generator
    )
    accept = u.log() < log_accept
    return start.where(accept, end), log_accept.exp()


class StepSize:
    """Per-image HMC step size [B], adapted towards ``target`` acceptance (Wu et al. 2017):
    a running mean a of each image's acceptance probability (mean over its chains), and
    eps <- eps * 1.02 if a > target else eps / 1.02 (within [1e-4, 0.5]) after each
    transition. With ``adapt=False`` eps stays at its initial value."""

    def __init__(
        self,
        batch: int,
        like: Tensor,
        initial: float | None = None,
        target: float = TARGET_ACCEPT,
        adapt: bool = True,
    ):
        initial = STEP_SIZE_INIT if initial is None else initial
        self.value = torch.full((batch,), initial, dtype=like.dtype, device=like.device)
        self.running = torch.full((batch,), target, dtype=like.dtype, device=like.device)
        self.target, self.adapt = target, adapt

    def broadcast(self) -> Tensor:
        """eps as [1, B, 1], against states [C, B, D]."""
        return self.value[None, :, None]

    def update(self, accept_prob: Tensor) -> None:
        """Adapt from the acceptance probabilities [C, B] of the transition just made."""
        if not self.adapt:
            return
        self.running = ACCEPT_SMOOTHING * self.running + (1 - ACCEPT_SMOOTHING) * accept_prob.mean(
            0
        )
        factor = torch.where(self.running > self.target, ADAPT_RATE, 1.0 / ADAPT_RATE)
        self.value = (self.value * factor).clamp(*STEP_SIZE_RANGE)


# -- the annealing path through a model's posterior --------------------------------------------


@contextmanager
def _frozen(model: LatentVariableModel):
    """The model's parameters without gradients (restored after), in eval mode."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


class _Path:
    """The geometric path f_beta(h) = f_0(h)^(1-beta) p(x, h)^beta for images x [B, D] of one
    model. A :class:`Point` of it carries ``parts = (log f_0, log p(x, h), grad log f_0,
    grad log p(x, h))`` at h, so moving to another beta costs no new evaluation."""

    def __init__(self, model: LatentVariableModel, x: Tensor, init: str):
        if init not in INITS:
            raise IwaeError(
                f"unknown AIS initial distribution {init!r}: choose one of {', '.join(INITS)}"
            )
        self.model, self.x, self.init = model, x, init
        self.sizes = list(model.latent_sizes)

    def split(self, h: Tensor) -> list[Tensor]:
        """[..., D] -> the layers [..., d_1], ..., [..., d_L]."""
        return list(torch.split(h, self.sizes, -1))

    def ends(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """log f_0(h), log p(x, h) [C, B] and their gradients with respect to h [C, B, D]."""
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            hs = self.split(h)
            if self.init == "q":
                log_f0 = self.model.log_q(hs, self.x)
                log_p = self.model.log_joint(self.x, hs)
            else:  # p(x, h) = p(h) p(x | h_1): the prior is computed once
                log_f0 = self.model.log_prior(hs)
                log_p = log_f0 + self.model.log_likelihood(self.x, hs[0])
            (g0,) = torch.autograd.grad(log_f0.sum(), h, retain_graph=True)
            (gp,) = torch.autograd.grad(log_p.sum(), h)
        return log_f0.detach(), log_p.detach(), g0, gp

    @staticmethod
    def at(point_parts: tuple[Tensor, ...], h: Tensor, beta: float) -> Point:
        """The point h of f_beta from its parts (log f_0, log p, their gradients)."""
        log_f0, log_p, g0, gp = point_parts
        return Point(
            h, (1.0 - beta) * log_f0 + beta * log_p, (1.0 - beta) * g0 + beta * gp, point_parts
        )

    def point(self, h: Tensor, beta: float) -> Point:
        return self.at(self.ends(h), h, beta)

    def evaluator(self, beta: float) -> Evaluate:
        return lambda h: self.point(h, beta)

    def initial(self, chains: int, generator=None) -> Tensor:
        """h_0 ~ f_0: [C, B, D], with the model's own samplers (for q the draws that
        ``model.log_weights(x, C, generator)`` makes from the same generator state)."""
        if self.init == "q":
            hs = self.model.sample_q(self.x, chains, generator)
        else:
            b = self.x.shape[0]
            hs = [h.reshape(chains, b, -1) for h in self.model.sample_prior(chains * b, generator)]
        return torch.cat([h.detach() for h in hs], -1)

    @staticmethod
    def log_ratio(point: Point) -> Tensor:
        """log p(x, h) - log f_0(h) [C, B]: d log f_beta / d beta."""
        return point.parts[1] - point.parts[0]


@dataclass
class AisRun:
    """One annealing run over a chunk of images: the log-weights [C, B], the mean acceptance
    probability of its transitions per image [B] (nan with no transition), the final state
    [C, B, D] and the final step sizes [B]."""

    log_w: Tensor
    acceptance: Tensor
    h: Tensor
    step_size: Tensor


def _anneal(
    path: _Path, h: Tensor, betas: Tensor, leapfrog_steps: int, generator, adapt: bool, bar=None
) -> AisRun:
    """Walk ``path`` through the betas in the order given, from states ``h`` [C, B, D]:
    before the move at each new beta_t the log-weight gains (beta_t - beta_{t-1}) * (log p -
    log f_0) at the current state; the last beta gets no move. Forward AIS walks 0..1 from
    f_0, reverse AIS 1..0 from the posterior."""
    betas = [float(b) for b in betas]
    point = path.point(h, betas[0])
    step = StepSize(h.shape[1], h, adapt=adapt)
    log_w = torch.zeros(h.shape[:2], dtype=h.dtype, device=h.device)
    accept_sum = torch.zeros(h.shape[1], dtype=h.dtype, device=h.device)
    for t in range(1, len(betas)):
        log_w = log_w + (betas[t] - betas[t - 1]) * path.log_ratio(point)
        if t < len(betas) - 1:
            point = path.at(point.parts, point.h, betas[t])
            point, accept_prob = hmc_transition(
                point, path.evaluator(betas[t]), step.broadcast(), leapfrog_steps, generator
            )
            step.update(accept_prob)
            accept_sum += accept_prob.mean(0)
        if bar is not None:
            bar.update(h.shape[1])
    moves = len(betas) - 2
    acceptance = accept_sum / moves if moves > 0 else torch.full_like(accept_sum, math.nan)
    return AisRun(log_w, acceptance, point.h, step.value)


def _check(steps: int, chains: int, leapfrog_steps: int) -> None:
    for name, value in (("steps", steps), ("chains", chains), ("leapfrog steps", leapfrog_steps)):
        if not isinstance(value, int) or value < 1:
            raise IwaeError(f"AIS {name} must be an integer >= 1, got {value!r}")


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(size, n - start)


def _progress(total: int, desc: str, progress: bool):
    return progress_bar(total, desc, "ex·step", enabled=progress, unit_scale=True)


def _anneal_in_chunks(
    model: LatentVariableModel,
    x: Tensor,
    betas: Tensor,
    chains: int,
    leapfrog_steps: int,
    init: str,
    generator: torch.Generator,
    adapt: bool,
    max_rows: int,
    desc: str,
    progress: bool,
    start: Callable[[_Path, int, int], Tensor],
) -> tuple[Tensor, Tensor]:
    """:func:`_anneal` along ``betas`` for the images ``x`` [N, D], in chunks of at most
    ``max_rows`` chain x image rows, each chunk's C chains starting from ``start(path, e0, ne)``
    (images e0 .. e0 + ne - 1). Returns the log-weights [C, N] and the acceptance [N]."""
    steps = betas.numel() - 1
    per_chunk = max(1, max_rows // chains)
    log_w, acceptance = [], []
    with _frozen(model), _progress(x.shape[0] * steps, desc, progress) as bar:
        for e0, ne in _chunks(x.shape[0], per_chunk):
            path = _Path(model, x[e0 : e0 + ne], init)
            run = _anneal(path, start(path, e0, ne), betas, leapfrog_steps, generator, adapt, bar)
            log_w.append(run.log_w)
            acceptance.append(run.acceptance)
    return torch.cat(log_w, 1), torch.cat(acceptance)


def forward_ais(
    model: LatentVariableModel,
    x: Tensor,
    steps: int,
    chains: int,
    leapfrog_steps: int = 10,
    init: str = "q",
    seed: int = 0,
    adapt: bool = True,
    max_rows: int = MAX_ROWS,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Forward AIS for each image of ``x`` [N, D]: ``{"log_w": [C, N], "log_px": [N],
    "acceptance": [N]}`` with log_px = log-mean-exp over the C chains (:func:`iwae.bounds.iwae`),
    a stochastic lower bound on log p(x). Deterministic given ``seed`` and ``max_rows``."""
    _check(steps, chains, leapfrog_steps)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    log_w, acceptance = _anneal_in_chunks(
        model,
        x,
        sigmoid_schedule(steps),
        chains,
        leapfrog_steps,
        init,
        generator,
        adapt,
        max_rows,
        f"AIS T={steps}",
        progress,
        lambda path, e0, ne: path.initial(chains, generator),
    )
    return {"log_w": log_w, "log_px": iwae(log_w), "acceptance": acceptance}


def reverse_ais(
    model: LatentVariableModel,
    x: Tensor,
    latents: list[Tensor],
    steps: int,
    chains: int,
    leapfrog_steps: int = 10,
    init: str = "q",
    seed: int = 0,
    adapt: bool = True,
    max_rows: int = MAX_ROWS,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Reverse AIS for images ``x`` [N, D] from exact posterior samples ``latents`` (h_1..h_L,
    [N, d_l] each; every chain of an image starts from its one sample): ``{"log_w": [C, N],
    "log_px": [N], "acceptance": [N]}`` with log_px = -log-mean-exp of the reverse weights,
    a stochastic upper bound on log p(x)."""
    _check(steps, chains, leapfrog_steps)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    h_all = torch.cat([h.detach() for h in latents], -1).to(x.dtype)

    def start(path, e0: int, ne: int) -> Tensor:  # every chain of an image from its exact latents
        return h_all[e0 : e0 + ne].unsqueeze(0).expand(chains, -1, -1).contiguous()

    log_w, acceptance = _anneal_in_chunks(
        model,
        x,
        sigmoid_schedule(steps).flip(0),
        chains,
        leapfrog_steps,
        init,
        generator,
        adapt,
        max_rows,
        f"reverse AIS T={steps}",
        progress,
        start,
    )
    return {"log_w": log_w, "log_px": -iwae(log_w), "acceptance": acceptance}


# -- simulated data and bidirectional Monte Carlo --------------------------------------------


@torch.no_grad()
def simulate(
    model: LatentVariableModel, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, list[Tensor]]:
    """n images from the model with their exact latents: h_L ~ p(h_L), ..., h_1 ~ p(h_1 | h_2)
    (``model.sample_prior``), x ~ p(x | h_1) (``model.sample_x``). Given x, the
    latents are an exact sample of p(h | x). Returns x [n, D] and h_1..h_L [n, d_l]."""
    hs = model.sample_prior(n, generator)
    x = model.sample_x(hs[0], generator)
    return x, hs


def bdmc(
    model: LatentVariableModel,
    n: int,
    steps: list[int],
    chains: int,
    leapfrog_steps: int = 10,
    init: str = "q",
    seed: int = 0,
    max_rows: int = MAX_ROWS,
    progress: bool = False,
    clock: Callable[[], float] | None = None,
) -> dict:
    """Bidirectional Monte Carlo (Grosse et al. 2015, 2016) on ``n`` images simulated from the
    model (:func:`simulate`, seeded by ``seed``): for each T in ``steps``, forward AIS (a
    stochastic lower bound on log p(x)) and reverse AIS from the exact latents (an upper bound).

    Returns ``{"steps": [T...], "lower": [...], "upper": [...], "gap": [...], "lower_stderr",
    "upper_stderr", "acceptance_forward", "acceptance_reverse", "seconds"}`` (each list one
    value per T, means over the n images; gap = upper - lower) and the per-image values
    ``"per_image": {"lower": [len(steps), n], "upper": ...}`` as tensors."""
    clock = clock or time.perf_counter
    with _frozen(model):
        p = next(model.parameters())
        x, latents = simulate(model, n, torch.Generator(device=p.device).manual_seed(seed))
    out: dict = {
        "steps": [int(t) for t in steps],
        "lower": [],
        "upper": [],
        "gap": [],
        "lower_stderr": [],
        "upper_stderr": [],
        "acceptance_forward": [],
        "acceptance_reverse": [],
        "seconds": [],
    }
    lowers, uppers = [], []
    for t in out["steps"]:
        started = clock()
        options = dict(
            chains=chains,
            leapfrog_steps=leapfrog_steps,
            init=init,
            max_rows=max_rows,
            progress=progress,
        )
        fwd = forward_ais(model, x, t, seed=seed + 1, **options)
        rev = reverse_ais(model, x, latents, t, seed=seed + 2, **options)
        out["seconds"].append(clock() - started)
        lo, up = fwd["log_px"].double(), rev["log_px"].double()
        lowers.append(lo)
        uppers.append(up)
        out["lower"].append(lo.mean().item())
        out["upper"].append(up.mean().item())
        out["gap"].append((up - lo).mean().item())
        out["lower_stderr"].append(_stderr(lo))
        out["upper_stderr"].append(_stderr(up))
        out["acceptance_forward"].append(_nanmean(fwd["acceptance"]))
        out["acceptance_reverse"].append(_nanmean(rev["acceptance"]))
    out["per_image"] = {"lower": torch.stack(lowers), "upper": torch.stack(uppers)}
    return out


def _stderr(values: Tensor) -> float:
    n = values.numel()
    return values.double().std().item() / math.sqrt(n) if n > 1 else math.nan


def _nanmean(values: Tensor) -> float | None:
    v = values.double().nanmean().item()
    return None if math.isnan(v) else v
