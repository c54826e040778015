"""The six sections of a training run's configuration (:class:`iwae.config.TrainConfig`).

Each section is a dataclass of some of the configuration's flat keys, checked once when it
is made (types, ranges, and how its keys go together) and holding the objects they describe:

- :class:`DataSection`       the training data, and the records of the data a run trained on
- :class:`NetworkSection`    the model's architecture and likelihood, resolved to a
  :class:`iwae.model.ModelConfig` (or :class:`iwae.conv.ConvConfig`)
- :class:`BoundSection`      the training objective, built as an :class:`iwae.bounds.Objective`
- :class:`OptimizerSection`  Adam, batches, skipped steps and the arithmetic
- :class:`PlanSection`       the passes (Burda et al.'s stages or epochs) and the seed
- :class:`LoggingSection`    what a run records, and how often

Which key belongs to which section, and the rules between sections, are
:class:`iwae.config.TrainConfig`'s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass, field, fields

from iwae import data as iwae_data
from iwae.bounds import Objective
from iwae.conv import ARCHITECTURES, DEFAULT_CHANNELS, ConvConfig, parse_channels
from iwae.errors import IwaeError
from iwae.model import ModelConfig, check_likelihood, parse_hidden, parse_latent
from iwae.user_code import is_code_spec, load_bound

DATASETS = iwae_data.DATASETS  # the built-in sets
BINARIZE = ("dynamic", "none")
#: ``--precision`` choices: the arithmetic of the networks in training steps
#: (:mod:`iwae.precision`); auto is decided when a run starts
PRECISIONS = ("auto", "fp32", "bf16")


def _check_types(section) -> None:
    """Each field of the dataclass ``section`` given to it holds a value of its annotated
    type (ints given for floats become floats)."""
    for f in fields(section):
        if not f.init:
            continue
        value, kind = getattr(section, f.name), str(f.type)
        if value is None and "None" in kind:
            continue
        if kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
            if ok:
                setattr(section, f.name, float(value))
        elif kind.startswith("str"):
            ok = isinstance(value, str)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind.startswith("list"):
            ok = isinstance(value, (list, tuple)) or ("str" in kind and isinstance(value, str))
        else:
            ok = isinstance(value, dict)
        if not ok:
            raise IwaeError(f"{f.name} must be of type {kind}, got {value!r}")


def _at_least_one(section, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise IwaeError(f"{name} must be >= 1, got {getattr(section, name)}")


@dataclass
class DataSection:
    """The training data. ``dataset`` is ``mnist``, ``omniglot`` or the path of the user's
    own data (``data_dir``: where the built-in sets are kept); ``validation`` trains on the
    training set less its validation part, ``n_train`` on its first images; ``binarize``
    (dynamic, none; None: dynamic for grey images). ``image_shape``, ``dataset_path``
    (absolute) and ``dataset_sha256`` record the data the run was trained on (filled in by
    :meth:`TrainConfig.for_data`; 28x28 and None for the built-in sets)."""

    dataset: str = "mnist"
    validation: bool = False
    n_train: int | None = None
    data_dir: str | None = None
    binarize: str | None = None
    image_shape: list | None = None
    dataset_path: str | None = None
    dataset_sha256: str | None = None

    def __post_init__(self):
        _check_types(self)
        if not self.dataset:
            raise IwaeError(
                "dataset must be mnist, omniglot or the path of a dataset, got an empty name"
            )
        if self.dataset.lower() in DATASETS:
            self.dataset = self.dataset.lower()
        if self.binarize is not None and self.binarize not in BINARIZE:
            raise IwaeError(f"binarize must be one of {', '.join(BINARIZE)}, got {self.binarize!r}")
        if self.n_train is not None and self.n_train < 1:
            raise IwaeError(f"n_train must be >= 1, got {self.n_train}")
        if self.image_shape is None and self.dataset in DATASETS:
            self.image_shape = [iwae_data.IMAGE_SIDE, iwae_data.IMAGE_SIDE]
        if self.image_shape is not None:
            if not (
                1 <= len(self.image_shape) <= 2
                and all(isinstance(d, int) and d >= 1 for d in self.image_shape)
            ):
                raise IwaeError(
                    "image_shape must be [H, W] or [D] of positive integers, got "
                    f"{self.image_shape!r}"
                )
            self.image_shape = list(self.image_shape)

    @property
    def x_dim(self) -> int | None:
        """Pixels per image, None while the data's shape is not known."""
        return None if self.image_shape is None else math.prod(self.image_shape)


@dataclass
class NetworkSection:
    """The model. Its architecture is ``layers`` (Burda et al.'s presets) or ``latent`` and
    ``hidden`` (any sizes; ``layers`` then is their length), with the Gaussian layers'
    ``scale``; ``model`` is the resolved :class:`iwae.model.ModelConfig` as a table (built
    from them once the input size ``x_dim`` is known), ``config`` the object itself (None
    before). ``init_weights``: another run's weights to start from.

    ``likelihood`` names p(x | h_1) (:data:`iwae.likelihoods.LIKELIHOODS`; a run without
    the key is Bernoulli), ``gaussian_scale`` a Gaussian's scale (from the decoder or
    learned). ``arch``: ``mlp`` (the above) or ``conv`` (:mod:`iwae.conv`: ``channels``
    widths, one stochastic layer of ``latent`` units, for images ``image_shape``; ``model``
    is then a :class:`iwae.conv.ConvConfig` table)."""

    layers: int | None = None
    scale: str = "exp"
    init_weights: str | None = None
    model: dict = field(default_factory=dict)
    latent: list | str | None = None
    hidden: list | str | None = None
    model_code: str | None = None
    likelihood: str = "bernoulli"
    gaussian_scale: str = "decoder"
    arch: str = "mlp"
    channels: list | str | None = None
    x_dim: InitVar[int | None] = None
    image_shape: InitVar[list | None] = None
    config: ModelConfig | ConvConfig | None = field(
        init=False, default=None, repr=False, compare=False
    )

    def __post_init__(self, x_dim: int | None, image_shape: list | None):
        _check_types(self)
        if self.model_code == GIVEN_IN_PYTHON:  # ``model`` describes it; nothing to build
            return
        check_likelihood(self.likelihood, self.gaussian_scale)
        if self.arch == "conv":
            self._resolve_conv()
        elif self.arch == "mlp":
            if self.channels is not None:
                raise IwaeError("--channels is for --arch conv (the MLP has --latent/--hidden)")
            self._resolve_layers()
        else:
            raise IwaeError(f"unknown arch {self.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
        if not self.model and x_dim is not None:
            self.model = self.architecture(x_dim, image_shape).to_dict()
        if self.model:
            self.config = self._model_config()  # validates the architecture
        else:  # validates the layers; the input size comes with the data
            self.architecture(1, [2 ** len(self.channels or ())] * 2)

    def _model_config(self) -> ModelConfig | ConvConfig:
        """The object of the table ``model``, which must describe ``arch`` and ``likelihood``
        (a table written before these keys existed is an MLP with a Bernoulli decoder)."""
        described = {
            "arch": self.model.get("arch", "mlp"),
            "likelihood": self.model.get("likelihood", "bernoulli"),
            "gaussian_scale": self.model.get("gaussian_scale", "decoder"),
        }
        given = {"arch": self.arch, "likelihood": self.likelihood}
        given["gaussian_scale"] = self.gaussian_scale
        if self.likelihood != "gaussian":  # the scale is a Gaussian's only
            del described["gaussian_scale"], given["gaussian_scale"]
        if described != given:
            raise IwaeError(
                f"the model table describes {described}, but the configuration says {given}: "
                "drop the model table (it is resolved again from the other keys)"
            )
        if self.arch == "conv":
            return ConvConfig.from_dict(self.model)
        return ModelConfig.from_dict(self.model)

    def _resolve_conv(self) -> None:
        """``--arch conv``: ``latent`` one size (default 50), ``channels`` parsed (default
        :data:`iwae.conv.DEFAULT_CHANNELS`); ``hidden`` and more than one layer refused."""
        if self.hidden is not None:
            raise IwaeError("--hidden is for --arch mlp (the conv architecture has --channels)")
        if self.scale != "exp":
            raise IwaeError("--scale is for --arch mlp (the conv model's sigma is exp(linear))")
        latent = [50] if self.latent is None else self.latent
        latent = parse_latent(latent) if isinstance(latent, str) else latent
        if len(latent) != 1 or self.layers not in (None, 1):
            raise IwaeError(
                "--arch conv has one stochastic layer: give --latent D (one size) and no --layers 2"
            )
        channels = DEFAULT_CHANNELS if self.channels is None else self.channels
        channels = parse_channels(channels) if isinstance(channels, str) else channels
        self.latent, self.channels, self.layers = list(latent), list(channels), 1

    def _resolve_layers(self) -> None:
        """``latent`` and ``hidden`` (lists, or text as on the command line) parsed and
        checked; ``layers`` their number (an explicit ``layers`` must agree), else 1."""
        if (self.latent is None) != (self.hidden is None):
            raise IwaeError(
                "--latent and --hidden go together: give both (e.g. --latent 100,50 "
                "--hidden 200x200,100x100) or neither (--layers 1|2)"
            )
        if self.latent is None:
            self.layers = 1 if self.layers is None else self.layers
            return
        latent = parse_latent(self.latent) if isinstance(self.latent, str) else self.latent
        hidden = parse_hidden(self.hidden) if isinstance(self.hidden, str) else self.hidden
        if (
            isinstance(latent, (list, tuple))
            and isinstance(hidden, (list, tuple))
            and len(latent) != len(hidden)
        ):
            raise IwaeError(
                f"--latent has {len(latent)} entries and --hidden {len(hidden)}: give one list of "
                "hidden layers per stochastic layer, e.g. --latent 100,50 --hidden 200x200,100x100"
            )
        try:  # sizes and counts
            checked = ModelConfig(x_dim=1, latent=latent, hidden=hidden, scale=self.scale)
        except (TypeError, ValueError):
            raise IwaeError(
                f"latent must be a list of sizes and hidden a list of lists of sizes, got latent="
                f"{self.latent!r} hidden={self.hidden!r}"
            ) from None
        self.latent, self.hidden = list(checked.latent), [list(h) for h in checked.hidden]
        if self.layers is not None and self.layers != len(self.latent):
            plural = "s" if len(self.latent) > 1 else ""
            raise IwaeError(
                f"--layers {self.layers} disagrees with --latent {','.join(map(str, self.latent))} "
                f"({len(self.latent)} stochastic layer{plural}): give one or the other"
            )
        self.layers = len(self.latent)

    def architecture(self, x_dim: int, image_shape: list | None = None) -> ModelConfig | ConvConfig:
        """The model of ``latent``/``hidden`` (or of the ``layers`` preset) for ``x_dim`` pixels,
        or (``arch`` conv) of ``channels`` and ``latent`` for images ``image_shape``."""
        likelihood = {"likelihood": self.likelihood, "gaussian_scale": self.gaussian_scale}
        if self.arch == "conv":
            shape = image_shape if image_shape is not None else [x_dim]
            return ConvConfig(shape, self.channels, self.latent, **likelihood)
        if self.latent is not None:
            return ModelConfig(
                x_dim=x_dim, latent=self.latent, hidden=self.hidden, scale=self.scale, **likelihood
            )
        preset = ModelConfig.preset(self.layers, x_dim=x_dim, scale=self.scale)
        return dataclasses.replace(preset, **likelihood)


#: ``objective_code`` of a run whose objective or ``model_code`` of a run whose model was
#: handed to :func:`iwae.fit` as a Python object (not named in a file or a configuration)
GIVEN_IN_PYTHON = "python"


@dataclass
class BoundSection:
    """The training objective, its sample counts and estimator; ``spec`` is the
    :class:`iwae.bounds.Objective` they name (built, and so checked, once).

    ``objective`` is a built-in name, or code of one's own named ``path/file.py:function``
    or ``package.module:function`` (:mod:`iwae.user_code`; ``objective_params`` its keyword
    arguments). For code, ``objective_code`` records the file it was loaded from and
    ``objective_sha256`` that file's hash, checked whenever the run's configuration is read
    again (resume, evaluate): a file changed since is refused, naming it. A bound handed
    to :func:`iwae.fit` as an object has ``objective_code`` :data:`GIVEN_IN_PYTHON` and no
    ``spec`` here (fit hands it to the engine again)."""

    objective: str = "iwae"
    k: int = 1
    m: int = 1
    beta: float = 0.5
    estimator: str = "reparam"
    objective_params: dict | None = None
    objective_code: str | None = None
    objective_sha256: str | None = None
    spec: Objective | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_types(self)
        if self.objective_code == GIVEN_IN_PYTHON:
            self.spec = None
        elif is_code_spec(self.objective):
            bound, loaded = load_bound(
                self.objective, self.objective_params, self.objective_sha256, self.objective_code
            )
            self.objective_code, self.objective_sha256 = loaded.path, loaded.sha256
            self.spec = Objective(k=self.k, beta=self.beta, estimator=self.estimator, custom=bound)
            self.k = self.spec.k
        else:
            if self.objective_params:
                raise IwaeError(
                    f"objective parameters apply to a bound of your own (file.py:function), "
                    f"not to {self.objective}"
                )
            self.spec = Objective(self.objective, self.k, self.m, self.beta, self.estimator)

    @property
    def samples(self) -> int:
        """Importance samples per example (M*K), known without the objective's code."""
        return self.k * self.m


@dataclass
class OptimizerSection:
    """Adam (Burda et al.: lr 1e-3, betas 0.9 and 0.999, eps 1e-4) on batches of
    ``batch_size``; training stops after ``max_bad_steps`` consecutive skipped steps.
    ``precision``: the networks' arithmetic in training steps (:mod:`iwae.precision`): fp32,
    bf16, or auto (the default) until a run starts, which records the precision it decided on
    here and ``precision_requested`` auto (None: the precision was asked for as it is; a
    run's config.json without either key: fp32, :func:`iwae.config.load_config`)."""

    batch_size: int = 20
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-4
    max_bad_steps: int = 20
    precision: str = "auto"
    precision_requested: str | None = None

    def __post_init__(self):
        _check_types(self)
        _at_least_one(self, ("batch_size", "max_bad_steps"))
        if not (self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.adam_eps > 0):
            raise IwaeError("Adam needs lr > 0, 0 <= beta1, beta2 < 1 and eps > 0")
        for key, allowed in (
            ("precision", PRECISIONS),
            ("precision_requested", (*PRECISIONS, None)),
        ):
            if getattr(self, key) not in allowed:
                raise IwaeError(
                    f"{key} must be one of {', '.join(PRECISIONS)}, got {getattr(self, key)!r}"
                )


@dataclass
class PlanSection:
    """The passes of a run: the first ``stages`` of Burda et al.'s schedule (stage i runs
    3^i passes at lr * 10^(-i/7)), or ``epochs`` passes at the constant rate (``epochs``
    given, ``stages`` is None); ``seed`` seeds the weights, data order and samples."""

    stages: int | None = 8
    epochs: int | None = None
    seed: int = 0

    def __post_init__(self):
        _check_types(self)
        if self.epochs is not None:
            self.stages = None
        if self.stages is not None and not 1 <= self.stages <= 8:
            raise IwaeError(f"stages must be between 1 and 8, got {self.stages}")
        if self.epochs is not None and self.epochs < 1:
            raise IwaeError(f"epochs must be >= 1, got {self.epochs}")
        if self.stages is None and self.epochs is None:
            raise IwaeError("give stages or epochs")

    def schedule(self, lr: float) -> list[tuple[int, int, float]]:
        """(stage, passes, learning rate) for each stage, from the base rate ``lr``."""
        if self.epochs is not None:
            return [(0, self.epochs, lr)]
        return [(i, 3**i, lr * 10 ** (-i / 7)) for i in range(self.stages)]


@dataclass
class LoggingSection:
    """What a run records: the IWAE-64 bound on ``eval_n`` test images every ``eval_every``
    passes (with ``curve_k``, also log p-hat(x) = L_curve_k), the test NLL with
    ``stage_nll_k`` samples at every stage end (0: off), a checkpoint every
    ``checkpoint_minutes``."""

    eval_every: int = 10
    eval_n: int = 1000
    curve_k: int | None = None
    stage_nll_k: int = 5000
    checkpoint_minutes: float = 5.0

    def __post_init__(self):
        _check_types(self)
        _at_least_one(self, ("eval_every", "eval_n"))
        if self.stage_nll_k < 0:
            raise IwaeError(f"stage_nll_k must be >= 0 (0: off), got {self.stage_nll_k}")
        if self.curve_k is not None and self.curve_k < 64:
            raise IwaeError(
                f"curve_k must be >= 64 (IWAE-64 uses its first 64 samples), got {self.curve_k}"
            )
        if not self.checkpoint_minutes > 0:
            raise IwaeError(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")
