"""The configuration of a training run: :class:`TrainConfig`, stored as ``config.json``.

A configuration is six sections, each validated once when it is made and holding the
objects it describes: the data (:class:`DataSection`), the network (:class:`NetworkSection`,
with its :class:`iwae.model.ModelConfig`), the bound (:class:`BoundSection`, with its
:class:`iwae.bounds.Objective`), Adam (:class:`OptimizerSection`), the plan of passes
(:class:`PlanSection`: Burda et al.'s stages or a number of epochs, and the seed) and what is
logged (:class:`LoggingSection`). Outside, a configuration is the flat table of keys it has
always been: the long options of ``iwae train`` with ``-`` written ``_``, in ``config.json``,
in a ``--config`` file and as attributes (``config.k``, ``config.objective``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import InitVar, dataclass, field, fields
from pathlib import Path

from iwae import data as iwae_data
from iwae.bounds import Objective
from iwae.conv import ARCHITECTURES, DEFAULT_CHANNELS, ConvConfig, parse_channels
from iwae.errors import IwaeError, RunDirError
from iwae.model import ModelConfig, check_likelihood, parse_hidden, parse_latent
from iwae.rundir import CONFIG_FILE, read_json
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
    bf16, or auto until a run starts, which records the precision it decided on here and
    ``precision_requested`` auto (None: the precision was asked for as it is; a config.json
    without either key: fp32)."""

    batch_size: int = 20
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-4
    max_bad_steps: int = 20
    precision: str = "fp32"
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


#: the keys of a configuration, in the order of ``config.json``, with the section holding each
KEYS = {
    **dict.fromkeys(("dataset",), "data"),
    **dict.fromkeys(("layers",), "network"),
    **dict.fromkeys(("objective", "k", "m", "beta", "estimator"), "bound"),
    **dict.fromkeys(("stages", "epochs", "seed"), "plan"),
    **dict.fromkeys(("batch_size", "lr", "beta1", "beta2", "adam_eps"), "optimizer"),
    **dict.fromkeys(("scale",), "network"),
    **dict.fromkeys(("validation", "n_train"), "data"),
    **dict.fromkeys(
        ("eval_every", "eval_n", "curve_k", "stage_nll_k", "checkpoint_minutes"), "logging"
    ),
    **dict.fromkeys(("max_bad_steps",), "optimizer"),
    **dict.fromkeys(("init_weights",), "network"),
    **dict.fromkeys(("data_dir",), "data"),
    **dict.fromkeys(("model", "latent", "hidden"), "network"),
    **dict.fromkeys(("binarize", "image_shape", "dataset_path", "dataset_sha256"), "data"),
    **dict.fromkeys(("objective_params", "objective_code", "objective_sha256"), "bound"),
    **dict.fromkeys(("model_code",), "network"),
    **dict.fromkeys(("likelihood", "gaussian_scale", "arch", "channels"), "network"),
    **dict.fromkeys(("precision", "precision_requested"), "optimizer"),
}

#: the sections of a configuration, in the order they are made (the network's input size
#: comes from the data)
SECTIONS = {
    "data": DataSection,
    "plan": PlanSection,
    "optimizer": OptimizerSection,
    "logging": LoggingSection,
    "bound": BoundSection,
    "network": NetworkSection,
}

#: keys of a run's ``config.json`` that record its data: taken afresh from the data when
#: the file is used as ``--config``
DATA_RECORDS = ("image_shape", "dataset_path", "dataset_sha256")


class TrainConfig:
    """Everything that determines a training run; stored as ``config.json``.

    Made from the flat keys (``TrainConfig(dataset="mnist", k=5)``, :meth:`from_dict`,
    :meth:`from_sources`) and read by them (``config.k``, ``config.objective`` the name,
    :meth:`to_dict`); inside, the sections ``data``, ``network``, ``bound``, ``optimizer``,
    ``plan`` and ``logging`` (see the module docstring), each validated once. A
    configuration does not change: :meth:`replace` makes another."""

    def __init__(self, **keys):
        unknown = set(keys) - set(KEYS)
        if unknown:
            raise IwaeError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        by_section = {name: {} for name in SECTIONS}
        for key, value in keys.items():
            by_section[KEYS[key]][key] = value
        made = {}
        for name, section in SECTIONS.items():
            extra = {}
            if name == "network":
                extra = {"x_dim": made["data"].x_dim, "image_shape": made["data"].image_shape}
            made[name] = section(**by_section[name], **extra)
        object.__setattr__(self, "_sections", made)
        _check_binarize(made["data"].binarize, made["network"].likelihood)

    data: DataSection = property(lambda self: self._sections["data"])
    network: NetworkSection = property(lambda self: self._sections["network"])
    bound: BoundSection = property(lambda self: self._sections["bound"])
    optimizer: OptimizerSection = property(lambda self: self._sections["optimizer"])
    plan: PlanSection = property(lambda self: self._sections["plan"])
    logging: LoggingSection = property(lambda self: self._sections["logging"])

    def __getattr__(self, name: str):
        if name in KEYS and "_sections" in self.__dict__:
            return getattr(self._sections[KEYS[name]], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"a TrainConfig does not change: config.replace({name}=...)")

    def __eq__(self, other) -> bool:
        return isinstance(other, TrainConfig) and self.to_dict() == other.to_dict()

    __hash__ = None

    def __repr__(self) -> str:
        return f"TrainConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def __getstate__(self) -> dict:
        return self.to_dict()

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def objective_spec(self) -> Objective:
        if self.bound.spec is None:
            raise IwaeError(
                f"the objective {self.objective} of this run was handed to iwae.fit as a Python "
                "object: give it to iwae.fit again to continue the run"
            )
        return self.bound.spec

    @property
    def model_given_in_python(self) -> bool:
        """The run's model was handed to :func:`iwae.fit` (``model`` only describes it)."""
        return self.model_code == GIVEN_IN_PYTHON

    @property
    def binarizes(self) -> bool:
        """The likelihood models binary pixels (Bernoulli): grey training images are
        binarized afresh at every use and test images once. Every other likelihood takes the
        images as they are."""
        return self.likelihood == "bernoulli"

    @property
    def eight_bit(self) -> bool:
        """The likelihood models 8-bit data (logistic-256): integer image files hold the
        levels 0..255, read as v / 255 (:func:`iwae.data.load_files`)."""
        return self.likelihood == "logistic-256"

    @property
    def model_config(self) -> ModelConfig | ConvConfig:
        if self.model_given_in_python:
            raise IwaeError(
                f"the model of this run ({self.model.get('class', 'a model')}) was handed to "
                "iwae.fit as a Python object: build it again and pass it (iwae.load(run, model))"
            )
        if self.network.config is None:
            raise IwaeError(
                f"the model's input size is not known before the data of {self.dataset} is read"
            )
        return self.network.config

    def architecture(self, x_dim: int) -> ModelConfig | ConvConfig:
        """The model of ``latent``/``hidden`` (or of the ``layers`` preset) for ``x_dim`` pixels
        (``arch`` conv: for images of the data's ``image_shape``)."""
        return self.network.architecture(x_dim, self.image_shape)

    def schedule(self) -> list[tuple[int, int, float]]:
        """(stage, passes, learning rate) for each stage."""
        return self.plan.schedule(self.optimizer.lr)

    @property
    def rows_per_step(self) -> int:
        """(example, sample) rows a training step computes: batch size x samples per example
        (M*K). What the thread count and lockstep grouping are chosen by."""
        return self.batch_size * self.bound.samples

    @property
    def total_passes(self) -> int:
        return sum(p for _, p, _ in self.schedule())

    def for_data(self, dataset: iwae_data.Dataset) -> TrainConfig:
        """This configuration with ``dataset``'s image shape, path and content hash recorded
        (and ``model`` built for its pixels if it was not given); checks that ``model``'s
        input size fits the images and that ``binarize`` suits them."""
        if math.prod(dataset.image_shape) != dataset.x_dim:
            raise IwaeError(
                f"dataset {dataset.name}: image_shape {list(dataset.image_shape)} does not hold "
                f"its {dataset.x_dim} pixels per image"
            )
        if self.binarizes and self.binarize == "none" and not dataset.binary:
            raise IwaeError(
                f"--binarize none: the training images of {dataset.name} are grey (not all 0 or "
                "1), and the Bernoulli decoder needs binary images: use --binarize dynamic"
            )
        config = self.replace(
            image_shape=list(dataset.image_shape),
            dataset_path=dataset.path,
            dataset_sha256=dataset.sha256,
        )
        if not config.model_given_in_python and config.model_config.x_dim != dataset.x_dim:
            raise IwaeError(
                f"the model takes {config.model_config.x_dim} pixels (model.x_dim), but the images "
                f"of {dataset.name} have {dataset.x_dim} "
                f"({'x'.join(map(str, dataset.image_shape))})"
            )
        return config

    def replace(self, **keys) -> TrainConfig:
        """This configuration with the flat ``keys`` changed (checked anew)."""
        return TrainConfig(**{**self.to_dict(), **keys})

    def to_dict(self) -> dict:
        """The flat keys and values, in the order of ``config.json`` (copies)."""
        return {key: copy.deepcopy(getattr(self, key)) for key in KEYS}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise IwaeError(
                f"a configuration must be a table of keys and values, got {type(d).__name__}"
            )
        return cls(**{str(key).replace("-", "_"): value for key, value in d.items()})

    @classmethod
    def from_sources(
        cls, file_keys: dict, cli_keys: dict, out: str | None = None
    ) -> tuple[TrainConfig, str]:
        """The configuration of ``iwae train --config FILE [options]``, and its run directory.

        ``file_keys`` (of :func:`read_config_file`; ``{}`` without ``--config``) and the
        options given on the command line, ``cli_keys``, which win. A run's ``config.json``
        works as a file: its records of the data are taken afresh from the data, and a
        key the options replace by another is dropped with it (``--epochs`` drops the
        file's ``stages`` and back; a new architecture or dataset the resolved ``model``;
        ``--latent``/``--hidden`` the file's ``layers`` and back). The run directory is
        ``out`` (``--out``), else the file's ``out``."""
        keys = {str(k).replace("-", "_"): v for k, v in file_keys.items()}
        out = out or keys.get("out")
        keys.pop("out", None)
        for key in DATA_RECORDS:
            keys.pop(key, None)
        keys.pop("precision_requested", None)  # a record of the run that decided its precision
        replaced = {"epochs": ("stages",), "stages": ("epochs",), "layers": ("latent", "hidden")}
        replaced.update(dict.fromkeys(("latent", "hidden"), ("layers",)))
        for given, dropped in replaced.items():
            if given in cli_keys:
                for key in dropped:
                    keys.pop(key, None)
        architecture = {"layers", "scale", "latent", "hidden", "dataset", "arch", "channels"}
        if (architecture | {"likelihood", "gaussian_scale"}) & cli_keys.keys():
            keys.pop("model", None)
        if out is None:
            raise IwaeError("give --out RUN_DIR (or --resume RUN_DIR)")
        return cls.from_dict({**keys, **cli_keys}), out


def _check_binarize(binarize: str | None, likelihood: str) -> None:
    """``--binarize dynamic`` draws binary images: for the Bernoulli likelihood only."""
    if binarize == "dynamic" and likelihood != "bernoulli":
        raise IwaeError(
            f"--binarize dynamic draws binary images, which only the Bernoulli likelihood "
            f"models: {likelihood} takes the images as they are (--binarize none, its default)"
        )


def read_config_file(path: str | Path) -> dict:
    """The keys of a TOML, YAML or JSON configuration file (``iwae train --config``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise IwaeError(f"cannot read configuration file {path}: {e}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            d = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        elif suffix == ".json":
            d = json.loads(text)
        else:
            raise IwaeError(f"configuration file {path}: expected .toml, .yaml, .yml or .json")
    except IwaeError:
        raise
    except Exception as e:  # each parser has its own error types
        raise IwaeError(
            f"configuration file {path} is not valid {suffix[1:].upper()}: {e}".replace("\n", " ")
        ) from None
    if not isinstance(d, dict):
        raise IwaeError(f"configuration file {path} must hold a table of keys and values")
    return d


def load_config(run_dir: str | Path) -> TrainConfig:
    """The configuration of the run directory ``run_dir`` (its ``config.json``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    try:
        return TrainConfig.from_dict(read_json(run_dir / CONFIG_FILE))
    except RunDirError:
        raise
    except IwaeError as e:
        raise RunDirError(f"{run_dir / CONFIG_FILE}: {e}") from None


def resume_config(run_dir: str | Path, data_dir: str | None = None) -> TrainConfig:
    """The configuration a run continues with: its own, read from the data directory
    ``data_dir`` where one is given (the data directory is not part of what a run computes)."""
    config = load_config(run_dir)
    return config if data_dir is None else config.replace(data_dir=str(data_dir))
