"""iwae: variational autoencoders trained and evaluated with importance-weighted bounds.

The public API (Burda et al. 2016; Rainforth et al. 2018):

- train and evaluate: :func:`fit`, :func:`evaluate_model`, :func:`run_ais`, :func:`load`;
- models: :class:`VAE` (Burda et al.'s MLPs, :class:`ModelConfig`), :class:`ModuleVAE`
  (your own encoder and decoder modules), the protocol :class:`LatentVariableModel` and its
  base :class:`GaussianLatentModel`; likelihoods :class:`Bernoulli`,
  :class:`ContinuousBernoulli`, :class:`Gaussian`, :class:`Logistic256`;
- bounds: :class:`Objective`, :class:`Bound` (one of your own), and the reductions of
  [S, B] log-weights :func:`elbo`, :func:`iwae`, :func:`miwae`, :func:`ciwae`,
  :func:`dreg_surrogate`;
- data: :func:`load_dataset`, :func:`from_arrays`, :class:`Dataset`;
- configuration: :class:`TrainConfig`; errors: :class:`IwaeError` and its kinds.

The modules hold the rest (:mod:`iwae.evaluate`, :mod:`iwae.ais`, :mod:`iwae.experiments`,
:mod:`iwae.report`, ...); ``iwae`` on the command line is :mod:`iwae.cli`.
"""

from iwae.api import evaluate_model, fit, load, run_ais
from iwae.bounds import Bound, Objective, ciwae, dreg_surrogate, elbo, iwae, miwae
from iwae.config import TrainConfig
from iwae.data import Dataset, from_arrays, load_dataset
from iwae.errors import DataError, IwaeError, RunDirError, TimeLimitReached
from iwae.latent import GaussianLatentModel, LatentVariableModel, ModuleVAE
from iwae.likelihoods import Bernoulli, ContinuousBernoulli, Gaussian, Logistic256
from iwae.model import VAE, ModelConfig

__version__ = "0.1.0"

__all__ = [
    "Bernoulli",
    "Bound",
    "ContinuousBernoulli",
    "DataError",
    "Dataset",
    "Gaussian",
    "GaussianLatentModel",
    "IwaeError",
    "LatentVariableModel",
    "Logistic256",
    "ModelConfig",
    "ModuleVAE",
    "Objective",
    "RunDirError",
    "TimeLimitReached",
    "TrainConfig",
    "VAE",
    "__version__",
    "ciwae",
    "dreg_surrogate",
    "elbo",
    "evaluate_model",
    "fit",
    "from_arrays",
    "iwae",
    "load",
    "load_dataset",
    "miwae",
    "run_ais",
]
