"""The configuration of a training run: :class:`TrainConfig`, stored as ``config.json``.

A configuration is six sections, each validated once when it is made and holding the
objects it describes (:mod:`iwae.config.sections`): the data (:class:`DataSection`), the
network (:class:`NetworkSection`, with its :class:`iwae.model.ModelConfig`), the bound
(:class:`BoundSection`, with its :class:`iwae.bounds.Objective`), Adam
(:class:`OptimizerSection`), the plan of passes (:class:`PlanSection`: Burda et al.'s stages
or a number of epochs, and the seed) and what is logged (:class:`LoggingSection`). Outside,
a configuration is the flat table of keys it has always been: the long options of ``iwae
train`` with ``-`` written ``_``, in ``config.json``, in a ``--config`` file and as
attributes (``config.k``, ``config.objective``).

This module holds :class:`TrainConfig` (the keys, their sections and the rules between
sections; :meth:`TrainConfig.from_sources` merges a ``--config`` file with the command
line) and the files (:func:`read_config_file`, :func:`load_config`, :func:`resume_config`).
The sections' names are importable from here too.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from iwae import data as iwae_data
from iwae.bounds import Objective
from iwae.config.sections import (
    BINARIZE,
    DATASETS,
    GIVEN_IN_PYTHON,
    PRECISIONS,
    BoundSection,
    DataSection,
    LoggingSection,
    NetworkSection,
    OptimizerSection,
    PlanSection,
)
from iwae.conv import ConvConfig
from iwae.errors import IwaeError, RunDirError
from iwae.model import ModelConfig
from iwae.rundir import CONFIG_FILE, read_json

__all__ = [
    "BINARIZE",
    "DATASETS",
    "DATA_RECORDS",
    "GIVEN_IN_PYTHON",
    "KEYS",
    "PRECISIONS",
    "SECTIONS",
    "BoundSection",
    "DataSection",
    "LoggingSection",
    "NetworkSection",
    "OptimizerSection",
    "PlanSection",
    "TrainConfig",
    "load_config",
    "read_config_file",
    "resume_config",
]

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
    """The configuration of the run directory ``run_dir`` (its ``config.json``). A run
    recorded before runs recorded their precision trained in fp32, and says so here."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    try:
        keys = read_json(run_dir / CONFIG_FILE)
        if isinstance(keys, dict):
            keys.setdefault("precision", "fp32")
        return TrainConfig.from_dict(keys)
    except RunDirError:
        raise
    except IwaeError as e:
        raise RunDirError(f"{run_dir / CONFIG_FILE}: {e}") from None


def resume_config(run_dir: str | Path, data_dir: str | None = None) -> TrainConfig:
    """The configuration a run continues with: its own, read from the data directory
    ``data_dir`` where one is given (the data directory is not part of what a run computes)."""
    config = load_config(run_dir)
    return config if data_dir is None else config.replace(data_dir=str(data_dir))
