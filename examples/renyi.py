"""The variational Renyi bound of Li & Turner (2016), a bound of your own for ``iwae``.

    L_alpha(x) = 1 / (1 - alpha) * log (1/S) sum_s w_s^(1 - alpha),   w_s = p(x, h_s) / q(h_s | x)

alpha = 0 is the IWAE bound L_S, alpha -> 1 the ELBO; for alpha in [0, 1) it lies between
them. Train with it from the command line, alpha as a parameter:

    iwae train --objective examples/renyi.py:bound --objective-param alpha=0.5 -k 5 ...

or from Python: ``iwae.Objective(custom=iwae.Bound(functools.partial(bound, alpha=0.5),
"renyi", samples=5))``.
"""

import math

import torch


def bound(log_w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """L_alpha per example from log-weights [S, B] -> [B], in log space."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
    scaled = (1.0 - alpha) * log_w
    return (torch.logsumexp(scaled, 0) - math.log(log_w.shape[0])) / (1.0 - alpha)
