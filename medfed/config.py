"""Experiment configuration: typed defaults, YAML files, validation, Flower run config.

An experiment is one frozen :class:`ExperimentConfig` made of one frozen section per
part of the system (``data``, ``model``, ``train``, ``strategy``, ``federation``,
``simulation``). Every leaf field carries its constraint in the field's metadata; the
same table drives validation, the list of known keys (for "did you mean" hints) and the
flattening into Flower's run config. All validation errors use one template::

    Config key 'train.lr' must be a float > 0. Got -1 (from runs.yaml).

The defaults describe a small federation that finishes on a 2-core CPU in minutes:
embedded BreastMNIST at 28 px, ``medvit_v2_nano``, 3 IID sites, 20 rounds of FedAvg
with two local AdamW epochs each (its time and accuracy on 2 cores: the README's
"Measured here").

Names that other parts validate (the model name, the strategy name and its
parameters) are only checked here to be non-empty strings or a mapping; their
registries check them when the run is built.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from medfed._io import write_bytes_atomic
from medfed.errors import MedfedError, MedfedWarning

__all__ = [
    "ConfigError",
    "ConfigFileNotFoundError",
    "DataConfig",
    "ExperimentConfig",
    "FederationConfig",
    "ModelConfig",
    "SimulationConfig",
    "StrategyConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "from_run_config",
    "list_scenarios",
    "load_config",
    "read_yaml_mapping",
    "save_config",
    "scenario_path",
    "to_run_config",
    "with_absolute_paths",
]

#: Source label used in error messages for values that came from a Flower run config.
RUN_CONFIG_SOURCE = "run_config"


#: The largest seed: numpy's legacy seeding (np.random.seed, RandomState) takes at most 2**32 - 1.
MAX_SEED = 2**32 - 1


class ConfigError(MedfedError):
    """An experiment config key is unknown, malformed or out of range.

    The message is one line naming the dotted key, what was expected, what was found
    and where it came from (file, ``--set`` override or run config).
    """


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """The experiment config file does not exist."""


# --------------------------------------------------------------------------------------
# Constraints: one small class per kind of value, each with a description that reads
# well after "must be" and a ``coerce`` that returns the normalised value or raises.
# --------------------------------------------------------------------------------------
class _Invalid(Exception):
    """Raised by a constraint when a value does not satisfy it (internal).

    Its argument, when given, replaces the constraint's description in the message: a
    bound that only some values reach (an int's upper bound) is named when it is the one
    broken.
    """


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but ``rounds: true`` is a mistake, not 1 round.
    return isinstance(value, int) and not isinstance(value, bool)


class _Constraint:
    description: str

    def coerce(self, value: Any) -> Any:
        raise NotImplementedError


#: The largest int a config key takes where it has no bound of its own: a run config
#: carries ints to the sites as Flower's sint64 (config_record_to_proto refuses more with
#: "Value out of range" once the run has started), and no count of rounds, epochs, images
#: or sites comes near 2**31 - 1.
MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class _Int(_Constraint):
    """An int in ``[low, high]``; when ``high`` is None, ``>= low`` and at most :data:`MAX_INT`.

    The description names :data:`MAX_INT` only to a value above it.
    """

    low: int
    high: int | None = None

    @property
    def description(self) -> str:
        if self.high is None:
            return f"an int >= {self.low}"
        return f"an int in the range [{self.low}, {self.high}]"

    def coerce(self, value: Any) -> int:
        if not _is_int(value) or value < self.low or (self.high is not None and value > self.high):
            raise _Invalid
        if self.high is None and value > MAX_INT:
            raise _Invalid(f"an int in the range [{self.low}, {MAX_INT}]")
        return value


@dataclass(frozen=True)
class _Float(_Constraint):
    """A finite float in an interval; ints are accepted and converted."""

    low: float
    high: float | None = None
    low_closed: bool = True
    high_closed: bool = True

    @property
    def description(self) -> str:
        if self.high is None:
            return f"a float {'>=' if self.low_closed else '>'} {self.low:g}"
        left = "[" if self.low_closed else "("
        right = "]" if self.high_closed else ")"
        return f"a float in the range {left}{self.low:g}, {self.high:g}{right}"

    def coerce(self, value: Any) -> float:
        if not (_is_int(value) or isinstance(value, float)):
            raise _Invalid
        value = float(value)
        if not math.isfinite(value):
            raise _Invalid
        above_low = value >= self.low if self.low_closed else value > self.low
        below_high = (
            self.high is None
            or (value <= self.high if self.high_closed else value < self.high)
        )
        if not (above_low and below_high):
            raise _Invalid
        return value


@dataclass(frozen=True)
class _Choice(_Constraint):
    options: tuple[Any, ...]

    @property
    def description(self) -> str:
        return "one of " + ", ".join(repr(option) for option in self.options)

    def coerce(self, value: Any) -> Any:
        # type() check: ``img_size: 28.0`` or ``true`` must not pass as an option.
        if not any(type(value) is type(o) and value == o for o in self.options):
            raise _Invalid
        return value


@dataclass(frozen=True)
class _Str(_Constraint):
    """A non-empty string, optionally matching ``pattern``."""

    pattern: str | None = None
    what: str = "a non-empty str"

    @property
    def description(self) -> str:
        return self.what

    def coerce(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _Invalid
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise _Invalid
        return value


@dataclass(frozen=True)
class _Optional(_Constraint):
    inner: _Constraint

    @property
    def description(self) -> str:
        return f"{self.inner.description} or null"

    def coerce(self, value: Any) -> Any:
        try:
            return None if value is None else self.inner.coerce(value)
        except _Invalid as exc:
            if exc.args:
                raise _Invalid(f"{exc.args[0]} or null") from None
            raise


@functools.cache
def _medmnist_2d_flags() -> tuple[str, ...]:
    """Sorted MedMNIST 2D flags (``medmnist.INFO`` flags without "3d" in their name)."""
    # medfed's own copy of the table: ``import medmnist`` would import torch (seconds).
    from medfed._medmnist_info import INFO_2D

    return tuple(sorted(INFO_2D))


@dataclass(frozen=True)
class _DatasetFlag(_Constraint):
    @property
    def description(self) -> str:
        flags = ", ".join(repr(flag) for flag in _medmnist_2d_flags())
        return f"a MedMNIST 2D dataset flag (one of {flags})"

    def coerce(self, value: Any) -> str:
        if not isinstance(value, str) or value not in _medmnist_2d_flags():
            raise _Invalid
        return value


_JSON_SCALARS = (type(None), bool, int, float, str)


def _is_json_like(value: Any) -> bool:
    if isinstance(value, _JSON_SCALARS):
        return True
    if isinstance(value, list):
        return all(_is_json_like(item) for item in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_json_like(v) for k, v in value.items())
    return False


@dataclass(frozen=True)
class _Params(_Constraint):
    """Keyword arguments of a strategy: a str-keyed mapping of YAML/JSON values."""

    @property
    def description(self) -> str:
        return (
            "a mapping from parameter names (str) to null, bool, int, float, str "
            "or lists/mappings of those"
        )

    def coerce(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping) or not _is_json_like(value):
            raise _Invalid
        # A private deep copy: the frozen config must not share a dict with its caller.
        return copy.deepcopy(dict(value))


@dataclass(frozen=True)
class _JsonList(_Params):
    """A list of YAML/JSON values (site profiles, patient groups), carried as JSON in a run config."""

    what: str = "a list"

    @property
    def description(self) -> str:
        return f"{self.what} (a YAML list of mappings, str, numbers, bool or null)"

    def coerce(self, value: Any) -> list[Any]:
        if not isinstance(value, list) or not _is_json_like(value):
            raise _Invalid
        return copy.deepcopy(value)


@dataclass(frozen=True)
class _JsonMapping(_Params):
    """A str-keyed mapping of YAML/JSON values, carried as JSON in a run config."""

    what: str = "a mapping"

    @property
    def description(self) -> str:
        return f"{self.what} (a YAML mapping of str keys to lists, numbers, str, bool or null)"


# --------------------------------------------------------------------------------------
# Error messages
# --------------------------------------------------------------------------------------
_INVALID_VALUE = "Config key {key!r} must be {expected}. Got {value!r}{origin}."


def _origin(source: str | None) -> str:
    return f" (from {source})" if source else ""


def _invalid_value(key: str, expected: str, value: Any, source: str | None) -> ConfigError:
    message = _INVALID_VALUE.format(
        key=key, expected=expected, value=value, origin=_origin(source)
    )
    return ConfigError(message.replace("\n", " "))


class _CrossKeyError(ConfigError):
    """A value that conflicts with another key's; :func:`_build` adds where both came from.

    Raised by a section's ``__post_init__``, which does not know the sources; without
    them (a config built in code) the message has no origin.
    """

    def __init__(self, message: str, key: str, other: str, hint: str = "") -> None:
        self.message, self.key, self.other, self.hint = message, key, other, hint
        super().__init__(self._text(""))

    def _text(self, origin: str) -> str:
        return f"{self.message}{origin}{'; ' + self.hint if self.hint else ''}."

    def __reduce__(self):  # picklable (Ray, Flower) despite its own __init__ arguments
        return type(self), (self.message, self.key, self.other, self.hint)

    def with_sources(self, sources: _Sources) -> ConfigError:
        """The same message, naming the source of ``key`` and, if another, of ``other``."""
        source, other_source = sources(self.key), sources(self.other)
        if not other_source or other_source == source:
            return ConfigError(self._text(_origin(source)))
        own = f"from {source}; " if source else ""
        return ConfigError(self._text(f" ({own}{self.other} from {other_source})"))


def _check(key: str, constraint: _Constraint, value: Any, source: str | None) -> Any:
    try:
        return constraint.coerce(value)
    except _Invalid as exc:
        expected = exc.args[0] if exc.args else constraint.description
        raise _invalid_value(key, expected, value, source) from None


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------
def _leaf(constraint: _Constraint, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    return field(default=default, metadata={"constraint": constraint}, **kwargs)


def _section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"section": cls})


class _Validated:
    """Validate and normalise every field after construction (also after ``replace``)."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            key = self._prefix + f.name
            value = getattr(self, f.name)
            section = f.metadata.get("section")
            if section is not None:
                if not isinstance(value, section):
                    raise _invalid_value(key, f"a {section.__name__}", value, None)
                continue
            object.__setattr__(self, f.name, _check(key, f.metadata["constraint"], value, None))


@dataclass(frozen=True)
class DataConfig(_Validated):
    """Which images the sites train on.

    Attributes
    ----------
    dataset : str
        MedMNIST 2D flag, e.g. ``"breastmnist"``.
    root : str or None
        Folder holding ``{flag}.npz`` / ``{flag}_{size}.npz``; None selects the data
        embedded in medfed (BreastMNIST at 28 px only).
    img_size : int
        Image side in pixels: 28, 64, 128 or 224.
    """

    _prefix: ClassVar[str] = "data."

    dataset: str = _leaf(_DatasetFlag(), "breastmnist")
    root: str | None = _leaf(_Optional(_Str()), None)
    img_size: int = _leaf(_Choice((28, 64, 128, 224)), 28)


@dataclass(frozen=True)
class ModelConfig(_Validated):
    """Which network the sites train.

    Attributes
    ----------
    name : str
        A name registered in ``medfed.models`` (checked when the model is built).
    init_from : str or None
        Start from these weights instead of a random model: a ``model.safetensors``
        written by ``medfed train`` or ``medfed simulate``, or such a run folder.
        FairLoRA needs it (its frozen backbone); every site must find the same file.
    """

    _prefix: ClassVar[str] = "model."

    name: str = _leaf(_Str(), "medvit_v2_nano")
    init_from: str | None = _leaf(_Optional(_Str()), None)


@dataclass(frozen=True)
class TrainConfig(_Validated):
    """Local training on each site, sent to the clients every round.

    Attributes
    ----------
    local_epochs : int
        Passes over the site's training split per round.
    batch_size : int
        Images per optimiser step.
    optimizer : str
        ``"adamw"`` or ``"sgd"``.
    lr : float
        Learning rate.
    weight_decay : float
        Decoupled (AdamW) or L2 (SGD) weight decay.
    momentum : float
        SGD momentum in [0, 1); ignored by AdamW.
    precision : str
        ``"auto"`` (bfloat16 autocast on a GPU of the Ampere generation or later for images
        of 224 px or more, where an H200 measured it faster; float32 otherwise),
        ``"float32"`` or ``"bfloat16"``.
    channels_last : bool
        Model and images in channels-last memory format.
    compile : bool
        ``torch.compile`` the model (once per process; the first round pays the compile).
    data_on_device : bool
        On a GPU, keep a site's training split on the device when it fits (uint8, at most
        a sixteenth of the device's memory) and augment there; no effect on a CPU.
    """

    _prefix: ClassVar[str] = "train."

    local_epochs: int = _leaf(_Int(1), 2)
    batch_size: int = _leaf(_Int(1), 32)
    optimizer: str = _leaf(_Choice(("adamw", "sgd")), "adamw")
    lr: float = _leaf(_Float(0.0, low_closed=False), 1e-3)
    weight_decay: float = _leaf(_Float(0.0), 0.05)
    momentum: float = _leaf(_Float(0.0, 1.0, high_closed=False), 0.9)
    precision: str = _leaf(_Choice(("auto", "float32", "bfloat16")), "auto")
    channels_last: bool = _leaf(_Choice((False, True)), False)
    compile: bool = _leaf(_Choice((False, True)), False)
    data_on_device: bool = _leaf(_Choice((True, False)), True)


@dataclass(frozen=True)
class StrategyConfig(_Validated):
    """Server-side aggregation.

    Attributes
    ----------
    name : str
        A name from ``medfed.strategies.list_strategies()`` or a
        ``"package.module:ClassName"`` path (checked when the strategy is built).
    params : dict
        Keyword arguments of that strategy, client-side ones included (FedProx's
        ``proximal_mu``, FedLD's ``margin_lambda``, FairLoRA's ``rank``...): the
        strategy sends those to the sites. A plain dict: ``frozen`` is shallow, do
        not mutate it.
    max_update_norm_z : float or None
        Drop a training reply whose update norm (over the parameters, not
        BatchNorm's running statistics or counters) lies more than this many robust
        standard deviations above the round's median (>= 3 replies); null (default):
        off, since with few sites of unequal size it drops honest large sites.
    clip_update_norm : float or None
        Scale every site's update of the parameters down to at most this L2 norm
        (BatchNorm's running statistics and counters pass unclipped); null: off.
    """

    _prefix: ClassVar[str] = "strategy."

    name: str = _leaf(_Str(), "fedavg")
    params: dict[str, Any] = _leaf(_Params(), default_factory=dict, hash=False)
    max_update_norm_z: float | None = _leaf(_Optional(_Float(0.0, low_closed=False)), None)
    clip_update_norm: float | None = _leaf(_Optional(_Float(0.0, low_closed=False)), None)


@dataclass(frozen=True)
class FederationConfig(_Validated):
    """How many sites there are, how data is split and how many take part per round.

    Attributes
    ----------
    num_sites : int
        Number of sites (clients).
    partition : str
        ``"iid"`` or ``"dirichlet"`` (label skew).
    dirichlet_alpha : float
        Concentration of the Dirichlet label split; smaller is more skewed.
    fraction_train : float
        Fraction of sites sampled for training each round, in (0, 1].
    fraction_evaluate : float
        Fraction of sites sampled for evaluation each round, in [0, 1].
    transfer_dtype : str
        ``"float32"``, ``"float16"`` or ``"bfloat16"``: precision of the weights on the
        wire (models and aggregation stay float32; :mod:`medfed.transfer`).
    scenario : str or None
        A named scenario (``medfed/sites/scenarios/NAME.yaml``: ``iid``,
        ``label-skew``, ``quantity-skew``, ``scanner-shift``,
        ``scanner-and-label-shift``, ``group-shift``, ``unseen-hospital``) or the path
        of such a YAML file. It fills the keys of this section that the experiment does
        not set itself (see :mod:`medfed.sites.profiles`).
    sites : list
        Site profiles (corruption chain, class mix, size, group mix, held out), one
        mapping per site; assigned to the training sites in order, cycling; profiles
        with ``held_out: true`` are extra sites that never train. Empty: plain sites.
    groups : list
        Patient groups of the federation: names, or mappings ``{name, corruptions}``.
    quantity_skew : dict
        Site sizes: ``{ratios: [...]}`` or ``{power_law: exponent}``; empty: equal.
    min_sites : int or None
        Quorum: a round's aggregate replaces the global model only if at least this
        many sites sent a valid training reply; below it the round is retried
        (``round_retries`` times) from the last complete round, then the run stops.
        None means a majority of the sites a round samples (:attr:`sites_per_round`):
        ``num_sites // 2 + 1`` when every site trains. At most :attr:`sites_per_round`.
    round_timeout_s : float
        Seconds the server waits for the sites' replies in each phase of a round (and
        for a quorum of sites to be connected); a site that has not answered by then is
        recorded as dropped out for that round. Must exceed the slowest site's local
        training time.
    round_retries : int
        How many times in a row a round that missed the quorum is retried before the
        run stops (resumable) with an error.
    pooled_test_metrics : bool
        Sites send, with their test metrics, the counts the server pools into metrics of
        the union of their test sets (``evaluate_pooled``): per-class score histograms and
        per-group confusions. With a small test split a 200-bin histogram tells each test
        image's label, patient group and score to within a bin, so this is off by default
        (the pooled figures are then missing; the sample-weighted ones remain): turn it on
        for simulated sites, or where every site agrees to send them.
    """

    _prefix: ClassVar[str] = "federation."

    num_sites: int = _leaf(_Int(1), 3)
    partition: str = _leaf(_Choice(("iid", "dirichlet")), "iid")
    dirichlet_alpha: float = _leaf(_Float(0.0, low_closed=False), 0.5)
    fraction_train: float = _leaf(_Float(0.0, 1.0, low_closed=False), 1.0)
    fraction_evaluate: float = _leaf(_Float(0.0, 1.0), 1.0)
    transfer_dtype: str = _leaf(_Choice(("float32", "float16", "bfloat16")), "float32")
    scenario: str | None = _leaf(_Optional(_Str()), None)
    sites: list[Any] = _leaf(_JsonList(what="a list of site profiles"), default_factory=list, hash=False)
    groups: list[Any] = _leaf(_JsonList(what="a list of patient groups"), default_factory=list, hash=False)
    quantity_skew: dict[str, Any] = _leaf(
        _JsonMapping(what="a quantity skew such as {power_law: 1.5}"), default_factory=dict, hash=False
    )
    min_sites: int | None = _leaf(_Optional(_Int(1)), None)
    round_timeout_s: float = _leaf(_Float(0.0, low_closed=False), 1800.0)
    round_retries: int = _leaf(_Int(0), 2)
    pooled_test_metrics: bool = _leaf(_Choice((True, False)), False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_sites is not None and self.min_sites > self.num_sites:
            raise _CrossKeyError(
                f"Config key 'federation.min_sites' must be an int <= federation.num_sites "
                f"({self.num_sites}) or null. Got {self.min_sites!r}",
                "federation.min_sites", "federation.num_sites",
            )
        if self.min_sites is not None and self.min_sites > self.sites_per_round:
            raise _CrossKeyError(
                f"Config key 'federation.min_sites' must be at most the sites a round samples "
                f"(fraction_train {self.fraction_train:g} of {self.num_sites} sites: {self.sites_per_round}), or null. "
                f"Got {self.min_sites!r}",
                "federation.min_sites", "federation.fraction_train",
                "lower min_sites or raise fraction_train",
            )
        # Profiles, groups and skew are checked where they are understood (medfed.sites).
        from medfed.sites.profiles import check_federation_profiles

        check_federation_profiles(self)

    @property
    def sites_per_round(self) -> int:
        """Training sites a round samples: ``fraction_train`` of ``num_sites``, rounded up, at least 1."""
        # Less a hair: 0.28 * 25 is 7.000000000000001 in floating point, and 7 sites are meant.
        return max(1, math.ceil(self.fraction_train * self.num_sites - 1e-9))

    @property
    def quorum(self) -> int:
        """``min_sites``, or a majority of the sites a round samples when it is None."""
        return self.min_sites if self.min_sites is not None else self.sites_per_round // 2 + 1


@dataclass(frozen=True)
class SimulationConfig(_Validated):
    """Resources of the local simulation.

    Attributes
    ----------
    cpus_per_site : float
        CPU cores reserved per simulated site.
    gpus_per_site : float
        GPU share per simulated site (0.25 runs four sites on one GPU).
    ray_address : str or None
        None starts a local Ray; ``"auto"`` or ``"host:port"`` joins a running one
        (engine ``"ray"`` or ``"auto"``).
    engine : str
        ``"inprocess"`` runs the sites one after the other in the launching process
        (no start-up cost; the choice for one GPU and for short CPU runs);
        ``"ray"`` runs them on Flower's simulation engine, in parallel on
        ``floor(cores / cpus_per_site)`` actors (many cores, fractional GPUs,
        clusters); ``"auto"`` picks one per machine
        (:func:`medfed.simulation.run.resolve_engine`). Both engines give the same
        weights (:mod:`medfed.simulation.local`), so the choice changes only the time.
    """

    _prefix: ClassVar[str] = "simulation."

    cpus_per_site: float = _leaf(_Float(0.0, low_closed=False), 1.0)
    gpus_per_site: float = _leaf(_Float(0.0), 0.0)
    ray_address: str | None = _leaf(_Optional(_Str()), None)
    engine: str = _leaf(_Choice(("auto", "inprocess", "ray")), "auto")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ray_address is not None and self.engine == "inprocess":
            raise _CrossKeyError(
                f"Config key 'simulation.ray_address' needs simulation.engine 'ray' or 'auto'. Got engine "
                f"'inprocess' with ray_address {self.ray_address!r}",
                "simulation.ray_address", "simulation.engine",
                hint="set simulation.engine: ray or remove ray_address",
            )


# The run folder is {output_dir}/{name}: a name must stay one safe path component. Its
# length is the file system's business, checked where a fresh run's folder is checked
# (medfed._io.check_output_folder): a bound here would also refuse the run folders an
# older medfed made, whose config.yaml is read back through it.
_RUN_NAME = _Str(
    pattern=r"[A-Za-z0-9_][A-Za-z0-9._-]*",
    what="a str of letters, digits, '.', '_' or '-' that does not start with '.' or '-'",
)


@dataclass(frozen=True)
class ExperimentConfig(_Validated):
    """One federated experiment.

    Attributes
    ----------
    name : str
        Run name; the run folder is ``{output_dir}/{name}``. Letters, digits, ``.``,
        ``_`` and ``-``, not first ``.`` or ``-``; a name longer than the file system
        takes is refused when a fresh run's folder is checked.
    seed : int
        Seed of every random choice (partition, sampling, initialisation), in
        [0, 2**32 - 1] (what numpy's seeding takes).
    output_dir : str
        Folder that holds run folders.
    rounds : int
        Federated rounds.
    data, model, train, strategy, federation, simulation
        The sections described by their classes.
    """

    name: str = _leaf(_RUN_NAME, "breastmnist-fedavg")
    seed: int = _leaf(_Int(0, MAX_SEED), 0)
    output_dir: str = _leaf(_Str(), "runs")
    rounds: int = _leaf(_Int(1), 20)
    data: DataConfig = _section(DataConfig)
    model: ModelConfig = _section(ModelConfig)
    train: TrainConfig = _section(TrainConfig)
    strategy: StrategyConfig = _section(StrategyConfig)
    federation: FederationConfig = _section(FederationConfig)
    simulation: SimulationConfig = _section(SimulationConfig)


# --------------------------------------------------------------------------------------
# Schema walking
# --------------------------------------------------------------------------------------
def _leaves(cls: type = ExperimentConfig, prefix: str = "") -> Iterator[tuple[str, _Constraint]]:
    """Yield ``(dotted_key, constraint)`` for every leaf field, in declaration order."""
    for f in fields(cls):
        section = f.metadata.get("section")
        if section is not None:
            yield from _leaves(section, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.metadata["constraint"]


@functools.cache
def _section_keys() -> frozenset[str]:
    """Dotted keys of the sections (``"train"``...), the keys that hold other keys."""
    return frozenset(_all_keys()) - {key for key, _ in _leaves()}


def _all_keys(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every dotted key, sections included, in declaration order."""
    keys: list[str] = []
    for f in fields(cls):
        keys.append(prefix + f.name)
        section = f.metadata.get("section")
        if section is not None:
            keys.extend(_all_keys(section, f"{prefix}{f.name}."))
    return keys


#: Other frameworks' names (Flower's, papers') for medfed's keys, where they mean one key.
_SYNONYMS = {
    "learning_rate": "train.lr",
    "epochs": "train.local_epochs",
    "num_epochs": "train.local_epochs",
    "num_clients": "federation.num_sites",
    "num_supernodes": "federation.num_sites",
    "min_clients": "federation.min_sites",
    "min_available_clients": "federation.min_sites",
    "num_rounds": "rounds",
    "fraction_fit": "federation.fraction_train",
    "proximal_mu": "strategy.params.proximal_mu",
}


def _unknown_key(key: str, source: str | None) -> ConfigError:
    known = _all_keys()
    parent, _, last = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    # Hints, best first, regardless of case: the same name in another section
    # ("lr" -> "train.lr", "train.LR" -> "train.lr"), another framework's name for a
    # key ("learning_rate" -> "train.lr"), a close spelling among the siblings
    # ("train.lrr" -> "train.lr"), then, under strategy, a strategy parameter.
    name = last.lower().replace("-", "_")
    same_name = [k for k in known if k.rpartition(".")[2] == name]
    close = difflib.get_close_matches(name, [sibling.lower() for sibling in siblings], n=1, cutoff=0.6)
    suggestion = None
    if same_name:
        suggestion = same_name[0]
    elif name in _SYNONYMS:
        suggestion = _SYNONYMS[name]
    elif close:
        suggestion = f"{parent}.{close[0]}" if parent else close[0]
    elif parent == "strategy":
        suggestion = f"strategy.params.{last}"
    if suggestion is not None:
        hint = f" (did you mean {suggestion!r}?)"
    elif siblings:
        where = f"under {parent!r}" if parent else "at the top level"
        hint = f" (valid keys {where}: {', '.join(siblings)})"
    else:
        hint = f" ({parent!r} holds a value, not keys)" if parent in known else ""
    origin = f" in {source}" if source else ""
    return ConfigError(f"Unknown config key {key!r}{hint}{origin}.")


class _Sources:
    """Where each value came from: the file by default, else the last override."""

    def __init__(self, default: str | None) -> None:
        self.default = default
        self.overrides: list[tuple[str, str]] = []

    def add(self, key: str, label: str) -> None:
        self.overrides.append((key, label))

    def __call__(self, key: str) -> str | None:
        for override_key, label in reversed(self.overrides):
            if _related(key, override_key):
                return label
        return self.default


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _build(cls: type, raw: Any, prefix: str, sources: _Sources) -> Any:
    if not isinstance(raw, Mapping):
        key = prefix.rstrip(".")
        raise _invalid_value(key, "a mapping of config keys", raw, sources(key))
    known = {f.name: f for f in fields(cls)}
    for name in raw:
        if name not in known:
            key = f"{prefix}{name}"
            raise _unknown_key(key, sources(key))
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            continue
        key = f"{prefix}{name}"
        section = f.metadata.get("section")
        if section is not None:
            kwargs[name] = _build(section, raw[name], key + ".", sources)
        else:
            kwargs[name] = _check(key, f.metadata["constraint"], raw[name], sources(key))
    try:
        return cls(**kwargs)
    except _CrossKeyError as exc:
        raise exc.with_sources(sources) from None


#: Folder of the named scenarios shipped with medfed (package data of medfed.sites).
SCENARIO_DIR = Path(__file__).resolve().parent / "sites" / "scenarios"


def list_scenarios() -> list[str]:
    """Names of the scenarios shipped with medfed (``federation.scenario``)."""
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.yaml"))


def scenario_path(name: str) -> Path:
    """The YAML file of a named scenario, or ``name`` itself when it is a YAML file path.

    Raises
    ------
    ConfigError
        If ``name`` is neither a shipped scenario nor an existing ``.yaml``/``.yml`` file.
    """
    shipped = SCENARIO_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    close = difflib.get_close_matches(name, list_scenarios(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"Config key 'federation.scenario' must name a scenario ({', '.join(list_scenarios())}) or a YAML "
        f"file. Got {name!r}; {hint}copy one from {SCENARIO_DIR} to start your own."
    )


def _with_scenario(raw: Mapping[str, Any], sources: _Sources, *, warn: bool = False) -> Mapping[str, Any]:
    """Fill the federation keys the experiment leaves unset from its named scenario.

    A scenario file is a fragment of the ``federation`` section (plus a
    ``description``); keys the experiment sets itself win. With ``warn``, each key a
    file sets to another value than the scenario's gets a :class:`MedfedWarning`
    (``partition: iid`` left in a copied config silently undid ``scenario: label-skew``);
    a ``--set`` is deliberate and does not.
    """
    federation = raw.get("federation") if isinstance(raw, Mapping) else None
    if not isinstance(federation, Mapping) or not isinstance(federation.get("scenario"), str):
        return raw
    name = federation["scenario"]
    path = scenario_path(name)
    fragment = read_yaml_mapping(path, "federation")
    fragment.pop("description", None)
    for key in fragment:
        if key == "scenario" or key not in {f.name for f in fields(FederationConfig)}:
            raise _unknown_key(f"federation.{key}", str(path))
    merged = dict(raw)
    merged["federation"] = {**fragment, **federation}
    for key in fragment:
        if key not in federation:
            sources.add(f"federation.{key}", f"scenario {name!r} ({path})")
        elif warn and federation[key] != fragment[key]:
            _warn_overruled(name, f"federation.{key}", federation[key], fragment[key], sources(f"federation.{key}"))
    return merged


def _warn_overruled(scenario: str, key: str, value: Any, scenario_value: Any, where: str | None) -> None:
    if where is not None and where.startswith("--set"):
        return  # typed on purpose; a file's key may be a template's default left in
    warnings.warn(MedfedWarning(
        f"{key} is {_short(value)}{f' ({where})' if where else ''}, where scenario {scenario!r} sets "
        f"{_short(scenario_value)}: the experiment's own keys win; remove the key to use the scenario's."
    ), stacklevel=3)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def config_from_dict(data: Mapping[str, Any], source: str | None = None) -> ExperimentConfig:
    """Build and validate a config from a nested mapping; missing keys keep defaults.

    Parameters
    ----------
    data : Mapping
        Nested mapping with snake_case keys, as in the YAML file.
    source : str, optional
        Where ``data`` came from, quoted in error messages.

    Returns
    -------
    ExperimentConfig

    Raises
    ------
    ConfigError
        If a key is unknown or a value breaks its constraint.
    """
    sources = _Sources(source)
    return _build(ExperimentConfig, _with_scenario(data, sources), "", sources)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads ``1e-3`` as a float.

    PyYAML silently keeps the last of two equal keys, and follows YAML 1.1, where a
    float needs a dot and a signed exponent: it reads ``lr: 1e-3`` as the string
    ``"1e-3"``. Both are easy mistakes in an experiment file. Merge keys
    (``<<: *base``) are YAML's: a key the mapping sets itself wins over a merged one.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self._refuse_duplicates(node, deep)
        # SafeConstructor flattens merge keys (``<<: *base``) first: merged keys give way
        # to the mapping's own, as YAML says.
        return super().construct_mapping(node, deep=deep)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Replace merge keys by the keys they merge, as YAML says: the mapping's own keys
        win, then the merged mappings' in the order given (``<<: [*a, *b]``: ``a``'s).

        PyYAML's own keeps the first of two merged keys only when both keys are the same
        str object: ``<<: [{lr: 0.5}, {lr: 0.9}]`` gave 0.9.
        """
        own: list[tuple[yaml.Node, yaml.Node]] = []
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                if key_node.tag == "tag:yaml.org,2002:value":  # as SafeConstructor does
                    key_node.tag = _STR_TAG
                own.append((key_node, value_node))
                continue
            subnodes = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for subnode in subnodes:
                if not isinstance(subnode, yaml.MappingNode):
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"expected a mapping or a list of mappings for merging, but found {subnode.id}",
                        subnode.start_mark,
                    )
                self.flatten_mapping(subnode)
                merged.extend(subnode.value)
        if len(own) == len(node.value):
            return
        taken = {_key_identity(key_node) for key_node, _ in own}
        kept = []
        for key_node, value_node in merged:
            identity = _key_identity(key_node)
            if identity is None or identity not in taken:
                kept.append((key_node, value_node))
                if identity is not None:
                    taken.add(identity)
        node.value = kept + own

    def _refuse_duplicates(self, node: yaml.MappingNode, deep: bool) -> None:
        """Refuse a key the mapping gives twice itself (a merge key's keys may repeat it)."""
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # its mappings are checked as mappings of their own
                for merged in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                    if isinstance(merged, yaml.MappingNode):
                        self._refuse_duplicates(merged, deep)
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let SafeLoader report it
                continue
            if duplicate:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)


def _key_identity(key_node: yaml.Node) -> tuple[str, str] | None:
    """What makes two scalar keys the same key (their tag and text); None for other keys."""
    return (key_node.tag, key_node.value) if isinstance(key_node, yaml.ScalarNode) else None


# 1e-3 and 1e3 are floats here (PyYAML's YAML 1.1 wants a dot: "1e-3" would be a str).
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


class _ConfigDumper(yaml.SafeDumper):
    """Writes what :class:`_UniqueKeyLoader` reads back: a string such as a run named
    ``1e3`` is quoted (PyYAML's own dumper left it bare, and it came back a float)."""


_ConfigDumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(key, line)
        self.key = key
        self.line = line


def read_yaml_mapping(path: Path, prefix: str = "") -> dict[str, Any]:
    """The mapping a YAML file holds, read as :func:`load_config` describes (numbers in plain decimal).

    ``prefix`` is the dotted key of the section the file fills ("" for an experiment,
    ``"federation"`` for a scenario), named in errors.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileNotFoundError(
            f"Config file '{path}' does not exist. Check the path, or give no file to "
            "use the default small federation."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read config file '{path}': {exc}.") from None
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if isinstance(node, yaml.MappingNode):
            _check_scalars(loader, node, prefix, str(path), in_file=True)
        data = None if node is None else loader.construct_document(node)
    except _DuplicateKey as exc:
        raise ConfigError(
            f"Config file '{path}' sets key {exc.key!r} twice (second time at line "
            f"{exc.line}); keep one."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        message = f"Cannot parse config file '{path}'{where}: {problem}."
        raise ConfigError(" ".join(message.split())) from None
    except RecursionError:  # PyYAML's composer recurses once per level
        raise ConfigError(
            f"Config file '{path}' is nested too deeply for YAML to read (a setting needs a handful of levels, "
            f"at most {_MAX_NESTING})."
        ) from None
    finally:
        loader.dispose()
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file '{path}' must hold a mapping of config keys at the top level "
            f"(e.g. 'rounds: 3'). Got a {type(data).__name__} instead."
        )
    return data


def _parse_override(text: str) -> tuple[str, Any]:
    """Split ``"key=value"`` and read the value as :func:`load_config` describes."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"Override {text!r} must have the form key=value, e.g. 'train.lr=0.01'."
        )
    label = f"--set {text}"
    _check_override_key(key, label)
    value_text = value_text.strip()
    if key in _text_keys() and not _is_quoted(value_text):
        # YAML would turn some text into something else: "site #1" loses its comment,
        # "yes" becomes True, "2024-01-01" a date. A text key takes the text as it is.
        return key, None if _text_keys()[key] and value_text in _NULLS else value_text
    return key, _yaml_override(key, value_text, text, label)


#: Spellings of null in YAML; for a text key that takes null, only these mean None.
_NULLS = ("", "~", "null", "Null", "NULL")
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


@functools.cache
def _text_keys() -> dict[str, bool]:
    """Keys whose constraint takes text, each mapped to whether it also takes null."""
    keys = {}
    for key, constraint in _leaves():
        optional = isinstance(constraint, _Optional)
        inner = constraint.inner if optional else constraint
        if isinstance(inner, (_Str, _DatasetFlag)) or (
            isinstance(inner, _Choice) and all(isinstance(option, str) for option in inner.options)
        ):
            keys[key] = optional
    return keys


def _is_quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""


def _yaml_override(key: str, value_text: str, text: str, label: str) -> Any:
    """Read an override value as YAML, refusing what YAML would silently change."""
    loader = _UniqueKeyLoader(value_text)
    try:
        node = loader.get_single_node()
        dropped = value_text[node.end_mark.index:] if node is not None else value_text
        if dropped.strip():
            raise ConfigError(
                f"Config key {key!r} would lose {dropped.strip()!r}: YAML reads ' #' as the start "
                f"of a comment; quote the whole value to keep it{_origin(label)}."
            )
        if node is None:  # "key=" means null, as in a YAML file
            return None
        _check_scalars(loader, node, key, label)
        return loader.construct_document(node)
    except _DuplicateKey as exc:
        raise ConfigError(f"Override {text!r} sets key {exc.key!r} twice.") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            " ".join(f"Cannot parse the value of override {text!r} as YAML: {problem}.".split())
        ) from None
    except RecursionError:  # PyYAML's composer recurses once per level
        raise ConfigError(
            f"The value of override {_short(text, 80)!r} is nested too deeply for YAML to read (a setting needs "
            f"a handful of levels, at most {_MAX_NESTING})."
        ) from None
    finally:
        loader.dispose()


def _check_scalars(
    loader: yaml.SafeLoader, node: yaml.Node, key: str, label: str, *, in_file: bool = False
) -> None:
    """Refuse numbers not in plain decimal; in an override, read unquoted scalars under text keys as text.

    YAML 1.1 reads ``010`` as 8 (octal), ``1:30`` as 90 (base 60) and ``0x10`` as 16;
    those are typos more often than intent, in an override and in a file alike.
    ``key`` is the dotted key of ``node`` ("" for a file's top level). In a file
    (``in_file``), text keys keep YAML's reading (``name: yes`` is refused as a bool,
    not taken as "yes"), and an error names the file's line.
    """
    seen: set[int] = set()  # collections met before, through an alias (&a ... *a)
    inside: list[int] = []  # the collections around the node

    def origin(node: yaml.Node) -> str:
        return _origin(f"{label}, line {node.start_mark.line + 1}" if in_file else label)

    def walk(node: yaml.Node, key: str) -> None:
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if id(node) in inside:
                raise ConfigError(
                    f"Config key {key!r} contains itself: a YAML alias (*name) inside the anchor (&name) it "
                    f"refers to{origin(node)}."
                )
            if len(inside) == _MAX_NESTING:
                # Validation, copies and run-folder writes recurse once per level (Python's limit: 1000).
                raise ConfigError(
                    f"Config key {key!r} is nested more than {_MAX_NESTING} lists or mappings deep"
                    f"{origin(node)}; no setting needs that."
                )
            if id(node) in seen:
                return
            seen.add(id(node))
            inside.append(id(node))
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in _mapping_pairs(node):
                    name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                    walk(value_node, f"{key}.{name}" if key else str(name))
            else:
                for item in node.value:
                    walk(item, key)
            inside.pop()
        elif node.style is not None:  # quoted: the user chose YAML's reading
            return
        elif key in _text_keys() or key in _NAME_KEYS:
            if not in_file and not (_text_keys().get(key) and node.value in _NULLS):
                node.tag = _STR_TAG
        elif node.tag in _NUMBER_TAGS and not _is_plain_decimal(node.value):
            raise ConfigError(
                f"Config key {key!r} must be a number written in plain decimal (such as 10, -2.5 or "
                f"1e-3). Got {node.value!r}, which YAML would read as "
                f"{loader.construct_object(node)!r}{origin(node)}."
            )

    walk(node, key)


#: How many lists or mappings deep a config value may nest (settings need a handful).
_MAX_NESTING = 100


def _mapping_pairs(node: yaml.MappingNode, _merging: tuple[int, ...] = ()) -> list[tuple[yaml.Node, yaml.Node]]:
    """The (key, value) node pairs of a mapping, those of its merge keys (``<<``) included.

    Unlike SafeConstructor's ``flatten_mapping``, leaves the nodes as they are: the
    loader flattens them again when it builds the mapping. A merged key that the mapping
    sets itself is listed twice (both values are checked). A merge value that is not a
    mapping or a list of mappings is left to the loader, which reports it.
    """
    pairs: list[tuple[yaml.Node, yaml.Node]] = []
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE_TAG:
            pairs.append((key_node, value_node))
            continue
        for merged in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
            if id(merged) in (*_merging, id(node)):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "found a merge key that merges a mapping into itself", key_node.start_mark,
                )
            if isinstance(merged, yaml.MappingNode):
                pairs.extend(_mapping_pairs(merged, (*_merging, id(node))))
    return pairs


#: Names inside list values (a patient group given by its name alone, a group's or a
#: site profile's ``name``): text, like the text keys (``groups=[yes, no]`` read True, False).
_NAME_KEYS = ("federation.groups", "federation.groups.name", "federation.sites.name")


def _is_plain_decimal(text: str) -> bool:
    """Whether Python's int or float reads ``text``, without a leading zero (``010``)."""
    if re.match(r"[-+]?0[0-9_]", text):
        return False
    for parse in (int, float):
        try:
            parse(text)
        except ValueError:
            continue
        return True
    return False


def _check_override_key(key: str, label: str) -> None:
    """Refuse keys outside the schema (``strategy.params.*`` is free-form)."""
    known = set(_all_keys())
    parts = key.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if prefix == "strategy.params":
            return
        if prefix not in known:
            raise _unknown_key(prefix, label)


def _set_dotted(raw: dict[str, Any], key: str, value: Any, sources: _Sources) -> list[str]:
    """Set ``key`` in the nested ``raw``; return the dotted keys that got a new value.

    A mapping given for a section is merged into it (see :func:`_merge`).
    """
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1], start=1):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            parent = ".".join(parts[:depth])
            raise _invalid_value(parent, "a mapping of config keys", child, sources(parent))
        node = child
    return _merge(node, {parts[-1]: value}, ".".join(parts[:-1]))


def _merge(node: dict[str, Any], values: Mapping[Any, Any], prefix: str) -> list[str]:
    """Set ``values`` in ``node``, merging a mapping into a section that holds one.

    ``--set train={lr: 0.5}`` changes only the learning rate: replacing the section
    would silently reset the file's other train keys to their defaults. A leaf (even
    a mapping such as ``strategy.params``) is replaced. Returns the dotted keys set.
    """
    changed: list[str] = []
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        old = node.get(name)
        if key in _section_keys() and isinstance(value, Mapping) and isinstance(old, dict):
            changed += _merge(old, value, key)
        else:
            node[name] = value
            changed.append(key)
    return changed


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (), *, run_folder: bool = False
) -> ExperimentConfig:
    """Load, merge and validate an experiment config.

    Parameters
    ----------
    path : str or PathLike, optional
        YAML file (snake_case keys). Missing keys keep their defaults; None uses the
        defaults only (the small CPU federation described in the module docstring).
        An unquoted number must be written in plain decimal, as in an override below
        (``rounds: 010``, ``0x10`` or ``1:30`` is refused, not read as 8, 16 or 90);
        merge keys (``<<: *base``) are read as YAML says.
    run_folder : bool
        ``path`` is a run folder's ``config.yaml`` (:func:`save_config`): its scenario was
        merged when the run began, so it is not read again (a scenario file given relative
        to another folder, or moved since, does not stop a resume or an evaluation), and
        keys that a ``--set`` made differ from the scenario's do not warn.
    overrides : sequence of str
        ``"dotted.key=value"`` items applied after the file, e.g. ``"rounds=5"``,
        ``"train.lr=0.01"`` or ``"strategy.params.proximal_mu=0.1"``. The value of a
        key that takes text (``name``, ``data.root``, ``train.optimizer``...) is the
        text after ``=``, stripped, as it is: ``data.root=/data/site #1`` keeps its
        ``#``, ``name=yes`` is ``"yes"``; only ``null``, ``~`` and nothing mean None,
        and only where the key takes null; in quotes it is read as a YAML quoted str.
        Any other value is parsed as YAML (``null`` for None, ``true``, ``[1, 2]``
        for a list, ``{lr: 0.5}`` for a mapping; unquoted text under a text key in
        it stays text), except that a number must be written in plain decimal, as
        Python's ``int``/``float`` read it and without a leading zero: ``010``
        (octal 8 in YAML 1.1), ``1:30`` (base 60: 90) and ``0x10`` are refused,
        ``1_000`` is 1000 and ``1e-3`` a float; and a `` #`` comment, which YAML
        would drop, is refused (quote the value). A mapping given for a section
        (``train={lr: 0.5}``) changes only the keys it names; a leaf, even a mapping
        such as ``strategy.params``, is replaced.

    Returns
    -------
    ExperimentConfig

    Raises
    ------
    ConfigFileNotFoundError
        If ``path`` does not exist.
    ConfigError
        For YAML syntax errors (with line and column), duplicate or unknown keys,
        malformed overrides and values that break their constraint.
    """
    if isinstance(overrides, str):  # a lone "a=b" would be iterated per character
        overrides = (overrides,)
    raw: dict[str, Any] = {}
    sources = _Sources(None)
    if path is not None:
        raw = read_yaml_mapping(Path(path))
        sources = _Sources(str(path))
    for text in overrides:
        key, value = _parse_override(text)
        label = f"--set {text}"
        # Set before add: an error on a parent names where the parent came from.
        for changed in _set_dotted(raw, key, value, sources):
            sources.add(changed, label)
    return _build(ExperimentConfig, raw if run_folder else _with_scenario(raw, sources, warn=True), "", sources)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Nested plain-dict copy of ``cfg`` with snake_case keys (the YAML layout)."""
    return dataclasses.asdict(cfg)


#: Keys that may differ between a run and its resumption: where the run lives, how many
#: rounds it runs (may only grow), how long a round waits for slow sites, and which engine or
#: Ray cluster runs the simulation (both engines give the same weights).
RESUME_MAY_CHANGE = ("name", "output_dir", "rounds", "simulation.engine", "simulation.ray_address",
                     "federation.round_timeout_s")


#: Keys that name a file or folder: a resume compares them resolved, and may name them
#: otherwise (relative to another working folder).
_PATH_KEYS = ("data.root", "model.init_from")


def study_fingerprint(cfg: ExperimentConfig) -> str:
    """A hex digest of what makes ``cfg`` one study: every key but :data:`RESUME_MAY_CHANGE`
    and the paths (``data.root``, ``model.init_from``).

    A run and its resumptions share it; a site keeps its state under it
    (:mod:`medfed.client.site_state`), so that another study (another strategy, model,
    dataset or setting) can never read that state.
    """
    def drop(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        kept = {}
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            if dotted in RESUME_MAY_CHANGE or dotted in _PATH_KEYS:
                continue
            kept[key] = drop(value, dotted + ".") if isinstance(value, dict) and dotted != "strategy.params" else value
        return kept

    text = json.dumps(drop(config_to_dict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def absolute_path(path: str | None) -> str | None:
    """``path`` as an absolute path (``~`` expanded, relative to the working folder); None stays None."""
    return None if path is None else str(Path(path).expanduser().resolve())


def with_absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the keys that name a file or folder (``data.root``, ``model.init_from``)
    made absolute against the working folder.

    A simulation stores this in its run folder, so that a resume, ``medfed evaluate``
    or ``medfed report`` started from another folder finds the same data and
    weights (a relative ``data.root: ../shared/data`` would be read against theirs).
    Deployment keeps paths as given: there each site resolves its own.
    """
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=absolute_path(cfg.data.root)),
        model=dataclasses.replace(cfg.model, init_from=absolute_path(cfg.model.init_from)),
    )


def save_config(cfg: ExperimentConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` as YAML, atomically (temporary file, then rename).

    Parameters
    ----------
    cfg : ExperimentConfig
    path : str or PathLike
        Destination; missing parent folders are created.

    Returns
    -------
    Path
        The written file; ``load_config(path)`` gives back ``cfg``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False)
    write_bytes_atomic(path, text.encode("utf-8"))
    return path


def _kebab(dotted: str) -> str:
    return dotted.replace("_", "-")


def to_run_config(cfg: ExperimentConfig) -> dict[str, bool | int | float | str]:
    """Flatten ``cfg`` into a Flower run config.

    Keys are dotted kebab-case (``"train.local-epochs"``); values are bool, int,
    float or str as Flower requires: None becomes ``""`` and ``strategy.params``
    becomes a JSON string. :func:`from_run_config` is the exact inverse.
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, constraint in _leaves():
        value = _get_dotted(cfg, key)
        if isinstance(constraint, _Params):
            value = json.dumps(value)
        elif value is None:
            value = ""
        flat[_kebab(key)] = value
    flat[SCENARIO_MERGED_KEY] = bool(cfg.federation.scenario)
    return flat


#: Run config key: the scenario's settings are in the run config (medfed merged them).
#: ``flwr run . --run-config 'federation.scenario="..."'`` sets the name alone.
SCENARIO_MERGED_KEY = "scenario-merged"


def _get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def from_run_config(
    flat: Mapping[str, bool | int | float | str], *, strict: bool = True
) -> ExperimentConfig:
    """Rebuild the config from a flat Flower run config made by :func:`to_run_config`.

    Its scenario was merged before :func:`to_run_config` and is not read again: an app
    may run in another folder than the one a scenario file was given relative to. A
    scenario named without ``SCENARIO_MERGED_KEY`` (``flwr run`` with
    ``federation.scenario`` set) is refused: its settings are not there.

    Parameters
    ----------
    flat : Mapping
        Dotted kebab-case keys; missing keys keep their defaults.
    strict : bool
        If True, a key that is not part of the experiment config is an error; if
        False it is ignored (for run configs that carry other app settings too).

    Returns
    -------
    ExperimentConfig

    Raises
    ------
    ConfigError
        For unknown keys (when strict), bad JSON in ``strategy.params`` or values
        that break their constraint.
    """
    leaves = {_kebab(key): (key, constraint) for key, constraint in _leaves()}
    flat = dict(flat)
    merged = flat.pop(SCENARIO_MERGED_KEY, False)
    if flat.get("federation.scenario") and merged is not True:
        raise ConfigError(
            f"federation.scenario={flat['federation.scenario']!r} is in the run config without its settings: "
            "'flwr run' does not apply a scenario. Run it with 'medfed simulate --set federation.scenario=...', "
            "or give the scenario's keys in the run config instead of its name."
        )
    raw: dict[str, Any] = {}
    sources = _Sources(RUN_CONFIG_SOURCE)
    for flat_key, value in flat.items():
        if flat_key not in leaves:
            if strict:
                raise _unknown_key(flat_key.replace("-", "_"), RUN_CONFIG_SOURCE)
            continue
        key, constraint = leaves[flat_key]
        if isinstance(constraint, _Params):
            value = _parse_params_json(key, value)
        elif isinstance(constraint, _Optional) and value == "":
            value = None
        _set_dotted(raw, key, value, sources)
    return _build(ExperimentConfig, raw, "", sources)


def _parse_params_json(key: str, value: Any) -> Any:
    expected = "a JSON object string such as '{\"proximal_mu\": 0.1}'"
    if not isinstance(value, str):
        raise _invalid_value(key, expected, value, RUN_CONFIG_SOURCE)
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise _invalid_value(key, expected, value, RUN_CONFIG_SOURCE) from None
