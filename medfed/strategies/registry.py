"""Strategy registry: names (and ``package.module:ClassName`` paths) to Flower strategies.

Built in: medfed's plug-ins ``"fedavg"``, ``"fedprox"``, ``"fedbn"``, ``"fedld"`` and
``"fairlora"`` (each with its client hooks) and Flower's own ``"fedadam"``,
``"fedyogi"``, ``"fedadagrad"``, ``"fedavgm"``, ``"fedmedian"`` and ``"fedtrimmedavg"``.
New strategies register themselves with :func:`register_strategy`; any other
``flwr.serverapp.strategy.Strategy`` subclass can be named by its import path.

Every strategy :func:`create_strategy` builds is a
:class:`~medfed.strategies.base.MedfedStrategy`: a class that is not one (Flower's,
a user's) is given the mixin, so all of them drop bad replies the same way, and
:func:`client_hooks_for` finds the client half (a class's ``client_hooks``
attribute; FedAvg's :class:`~medfed.strategies.hooks.ClientHooks` otherwise).

:func:`create_strategy` fills in the sampling arguments that follow from the federation
(``fraction_*``, ``min_*_nodes``) for every class that accepts them, then the user's
parameters, after checking their names and simple types against the constructor.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import typing
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from medfed.errors import MedfedError
from ._aggregation import aggregate_site_metrics
from .base import MedfedStrategy, ReplyPolicy
from .hooks import ClientHooks

__all__ = ["StrategyError", "client_hooks_for", "create_strategy", "list_strategies", "register_strategy",
           "study_group_count"]

StrategyFactory = Callable[..., Strategy]
_F = TypeVar("_F", bound=Callable[..., Any])

_REGISTRY: dict[str, StrategyFactory] = {}

# Set by create_strategy from the federation; giving them again in strategy.params
# would make two sources of truth.
_FROM_FEDERATION = ("fraction_train", "fraction_evaluate")
#: Flower's parameters that medfed sets itself, and what to set instead: a value here was
#: either ignored (min_*: the quorum decides; eta_l: Flower's FedOpt only logs it) or broke
#: the run mid-way (the record keys the ClientApp reads, the metric aggregation functions).
_SET_BY_MEDFED = {
    "min_available_nodes": "federation.num_sites",
    "min_train_nodes": "federation.fraction_train and federation.min_sites",
    "min_evaluate_nodes": "federation.fraction_evaluate",
    "eta_l": "train.lr (the sites' learning rate; Flower's FedOpt strategies only log eta_l)",
    "arrayrecord_key": "nothing: medfed's sites send and read the arrays under Flower's default key",
    "configrecord_key": "nothing: medfed's sites read their instructions under Flower's default key",
    "weighted_by_key": "nothing: replies are weighted by their num-examples",
    "train_metrics_aggr_fn": "nothing: medfed's NaN-aware weighted mean aggregates the metrics",
    "evaluate_metrics_aggr_fn": "nothing: medfed's NaN-aware weighted mean aggregates the metrics",
}


class StrategyError(MedfedError):
    """A strategy name, import path or parameter is wrong."""


def check_number(strategy: str, name: str, value: Any, in_range: Callable[[float], bool], what: str, *,
                 integer: bool = False, key: str | None = None) -> None:
    """Refuse a strategy parameter that is not a finite number (an int if ``integer``) with ``in_range(value)``.

    1e400 in YAML is inf, which Flower and the strategies would take; ``key`` is the
    config key named in the message (default ``strategy.params.<name>``).
    """
    number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and in_range(value)):
        raise StrategyError(
            f"The {name!r} parameter of strategy {strategy!r} ({key or f'strategy.params.{name}'}) must be {what}. "
            f"Got {value!r} instead."
        )


def register_strategy(name: str) -> Callable[[_F], _F]:
    """Register a strategy class (or a function returning a strategy) under ``name``.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"fedld"``; must be non-empty and contain no ``":"``
        (that marks import paths). Registering a name twice replaces the first entry
        with a ``UserWarning``.

    Returns
    -------
    Callable
        A decorator that registers its argument and returns it unchanged.

    Examples
    --------
    >>> @register_strategy("myavg")  # doctest: +SKIP
    ... class MyAvg(flwr.serverapp.strategy.FedAvg): ...
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise StrategyError(
            f"A strategy name must be a non-empty str without ':'. Got {name!r} instead."
        )

    def decorator(factory: _F) -> _F:
        previous = _REGISTRY.get(name)
        if previous is not None and previous is not factory:
            warnings.warn(
                f"Strategy {name!r} is already registered ({_qualname(previous)}); "
                f"replacing it with {_qualname(factory)}.",
                UserWarning,
                stacklevel=2,
            )
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_strategies() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(_REGISTRY)


def create_strategy(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    num_sites: int,
    fraction_train: float = 1.0,
    fraction_evaluate: float = 1.0,
    num_rounds: int | None = None,
    num_groups: int | None = None,
    reply_policy: ReplyPolicy | None = None,
) -> Strategy:
    """Build a Flower strategy for a federation of ``num_sites`` sites.

    Parameters
    ----------
    name : str
        A registered name (see :func:`list_strategies`) or ``"package.module:ClassName"``
        naming a ``flwr.serverapp.strategy.Strategy`` subclass.
    params : Mapping[str, Any], optional
        Keyword arguments of the strategy (``strategy.params`` in the experiment
        config). Not the fractions and ``min_*_nodes``, which come from the federation,
        nor the Flower parameters medfed sets itself (``_SET_BY_MEDFED``).
    num_sites : int
        Number of sites in the federation (>= 1).
    fraction_train, fraction_evaluate : float
        Fractions of sites sampled per round for training, in (0, 1], and
        evaluation, in [0, 1] (0 turns federated evaluation off).
    num_rounds : int, optional
        Rounds of the run, passed to strategies whose constructor takes
        ``num_rounds`` (FairLoRA's EMA schedule).
    num_groups : int, optional
        Patient groups the federation declares (``federation.groups``), passed to
        strategies whose constructor takes ``num_groups`` (FairLoRA); a different
        ``num_groups`` in ``params`` is an error.
    reply_policy : ReplyPolicy, optional
        Outlier and clipping settings of the reply checks (default ``ReplyPolicy()``).

    Returns
    -------
    flwr.serverapp.strategy.Strategy
        The strategy, with (where its constructor accepts them)
        ``min_available_nodes = num_sites``, ``min_train_nodes =
        max(1, ceil(fraction_train * num_sites))`` and ``min_evaluate_nodes`` likewise
        (0 when ``fraction_evaluate`` is 0). Flower samples the sites of a round
        before it waits for ``min_available_nodes``, so waiting for all sites keeps
        round 1 from starting with the first two that connected.

    Raises
    ------
    StrategyError
        For an unknown name, an import path that does not load or does not name a
        Strategy subclass, unknown or missing parameters, values of the wrong type, and
        values the strategy's constructor refuses (its ``ValueError``, ``TypeError`` or
        ``AssertionError``, message kept), so that a bad value fails before the run.
    """
    _check_federation(num_sites, fraction_train, fraction_evaluate)
    params = dict(params or {})
    factory = _resolve(name)
    signature = _signature(name, factory)
    accepted = {
        p.name: p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())

    for key in params:
        if key in _FROM_FEDERATION:
            raise StrategyError(
                f"Strategy parameter {key!r} is set from federation.{key}; remove it "
                "from strategy.params."
            )
        if key not in accepted and not takes_any:
            raise StrategyError(_unknown_parameter(
                name, key, {k: v for k, v in accepted.items() if k not in _SET_BY_MEDFED}))
        if key in _SET_BY_MEDFED:
            instead = _SET_BY_MEDFED[key]
            raise StrategyError(
                f"Strategy parameter {key!r} is set by medfed; remove it from strategy.params"
                + (f" ({instead.removeprefix('nothing: ')})." if instead.startswith("nothing: ") else f" and set {instead}.")
            )

    derived = {
        "fraction_train": fraction_train,
        "fraction_evaluate": fraction_evaluate,
        "min_available_nodes": num_sites,
        "min_train_nodes": max(1, math.ceil(fraction_train * num_sites)),
        "min_evaluate_nodes": (
            0 if fraction_evaluate == 0 else max(1, math.ceil(fraction_evaluate * num_sites))
        ),
    }
    # Sites with a single class report AUC = NaN; don't let one poison the mean.
    derived["train_metrics_aggr_fn"] = aggregate_site_metrics
    derived["evaluate_metrics_aggr_fn"] = aggregate_site_metrics
    # A constructor with **kwargs (FedLD, FairLoRA) hands them to Flower's FedAvg, which
    # takes every key above; ``num_rounds`` only goes where it is named.
    kwargs = {key: value for key, value in derived.items() if key in accepted or takes_any}
    if num_rounds is not None and "num_rounds" in accepted:
        kwargs["num_rounds"] = num_rounds
    if num_groups is not None and "num_groups" in accepted:
        if params.get("num_groups", num_groups) != num_groups:
            raise StrategyError(
                f"strategy.params.num_groups is {params['num_groups']!r}, but federation.groups declares "
                f"{num_groups} groups; remove num_groups from strategy.params (it follows federation.groups)."
            )
        kwargs["num_groups"] = num_groups
    kwargs.update(_typed_params(name, factory, params))
    if getattr(factory, "__module__", "").startswith("flwr."):
        # Flower's constructors take any number: a negative eta ran a whole study backwards.
        for key, (in_range, what) in _FLOWER_RANGES.items():
            if key in params:
                check_number(name, key, kwargs[key], in_range, what)

    missing = [
        p.name
        for p in accepted.values()
        if p.default is p.empty and p.name not in kwargs
    ]
    if missing:
        raise StrategyError(
            f"Strategy {name!r} needs the parameter(s) {', '.join(missing)}; set them "
            "in strategy.params."
        )

    if isinstance(factory, type) and not issubclass(factory, MedfedStrategy):
        # Flower's and users' classes get the same reply checks as medfed's own.
        factory = _with_medfed_checks(factory)
    try:
        instance = factory(**kwargs)
    except MedfedError:
        raise  # already one line naming its key
    except (ValueError, TypeError, AssertionError) as exc:
        # Flower's constructors (FedTrimmedAvg's beta) and users' check values this way.
        raise StrategyError(_refused(name, params, exc)) from exc
    if not isinstance(instance, Strategy):
        raise StrategyError(
            f"Strategy {name!r} must build a flwr.serverapp.strategy.Strategy. Got "
            f"{type(instance).__name__} instead."
        )
    if not isinstance(instance, MedfedStrategy):
        raise StrategyError(
            f"Strategy {name!r} is a function that built a {type(instance).__name__}; a factory function "
            "must build a medfed.strategies.MedfedStrategy (mix it in first) so that its replies are checked."
        )
    if reply_policy is not None:
        instance.reply_policy = reply_policy
    return instance


def client_hooks_for(name: str) -> type[ClientHooks]:
    """The client half of the strategy ``name`` (registered name or import path).

    Returns
    -------
    type[ClientHooks]
        The class's ``client_hooks`` attribute; :class:`ClientHooks` (FedAvg's: the
        whole model travels) when it has none or ``name`` is a factory function.

    Raises
    ------
    StrategyError
        As :func:`create_strategy` for unknown names and bad import paths.
    """
    factory = _resolve(name)
    hooks = getattr(factory, "client_hooks", ClientHooks) if isinstance(factory, type) else ClientHooks
    if not (isinstance(hooks, type) and issubclass(hooks, ClientHooks)):
        raise StrategyError(
            f"Strategy {name!r} has client_hooks = {hooks!r}; it must be a subclass of "
            "medfed.strategies.hooks.ClientHooks."
        )
    return hooks


_WRAPPED: dict[type, type] = {}


def _with_medfed_checks(cls: type) -> type:
    """``cls`` with :class:`MedfedStrategy` mixed in front (one subclass per class)."""
    if cls not in _WRAPPED:
        _WRAPPED[cls] = type(
            cls.__name__, (MedfedStrategy, cls),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__},
        )
    return _WRAPPED[cls]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _check_federation(num_sites: Any, fraction_train: Any, fraction_evaluate: Any) -> None:
    def is_real(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not isinstance(num_sites, int) or isinstance(num_sites, bool) or num_sites < 1:
        raise StrategyError(
            f"The 'num_sites' argument of create_strategy must be an int >= 1. "
            f"Got {num_sites!r} instead."
        )
    if not is_real(fraction_train) or not 0 < fraction_train <= 1:
        raise StrategyError(
            "The 'fraction_train' argument of create_strategy must be a float in the "
            f"range (0, 1]. Got {fraction_train!r} instead."
        )
    if not is_real(fraction_evaluate) or not 0 <= fraction_evaluate <= 1:
        raise StrategyError(
            "The 'fraction_evaluate' argument of create_strategy must be a float in the "
            f"range [0, 1]. Got {fraction_evaluate!r} instead."
        )


def _resolve(name: Any) -> StrategyFactory:
    if not isinstance(name, str) or not name:
        raise StrategyError(f"A strategy name must be a non-empty str. Got {name!r} instead.")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _import_strategy_class(name)
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise StrategyError(
        f"Unknown strategy {name!r}{hint}. Registered: {', '.join(list_strategies())}; "
        "or give 'package.module:ClassName' of a flwr.serverapp.strategy.Strategy subclass."
    )


def _import_strategy_class(path: str) -> type[Strategy]:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise StrategyError(
            f"Strategy path {path!r} must have the form 'package.module:ClassName'."
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code
        raise StrategyError(
            f"Cannot import module {module_name!r} for strategy {path!r}: "
            f"{type(exc).__name__}: {exc}; install it, or put the folder that holds it on PYTHONPATH "
            "(in simulation, at every site too).".replace("\n", " ")
        ) from exc
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise StrategyError(
                f"Module {module_name!r} has no attribute {attribute!r} (strategy {path!r})."
            )
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        raise StrategyError(
            f"Strategy {path!r} must name a subclass of flwr.serverapp.strategy.Strategy. "
            f"Got {obj!r} instead."
        )
    if inspect.isabstract(obj):
        abstract = ", ".join(sorted(obj.__abstractmethods__))
        raise StrategyError(
            f"Strategy {path!r} is abstract: it does not implement {abstract}."
        )
    return obj


def study_group_count(groups: Mapping | list | tuple, strategy: str, params: Mapping[str, Any]) -> int:
    """The patient groups a study has: those the federation declares (``federation.groups``),
    else a group-aware strategy's ``num_groups`` (FairLoRA's, given or its default), else 0.

    Every site reports metrics and counts for groups ``0 .. count - 1`` (Flower demands the
    same keys from every site), and refuses data with group ids beyond them.
    """
    if groups:
        return len(groups)
    parameter = _signature(strategy, _resolve(strategy)).parameters.get("num_groups")
    if parameter is None:
        return 0
    return int(params.get("num_groups", 0 if parameter.default is parameter.empty else parameter.default))


def _signature(name: str, factory: StrategyFactory) -> inspect.Signature:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"Cannot read the parameters of strategy {name!r}: {exc}.") from exc


def _unknown_parameter(name: str, key: str, accepted: Mapping[str, inspect.Parameter]) -> str:
    choices = [p for p in accepted if p not in _FROM_FEDERATION]
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    accepted_text = f"accepted: {', '.join(choices)}" if choices else "it takes none in strategy.params"
    return f"Strategy {name!r} has no parameter {key!r}{hint} ({accepted_text})."


def _refused(name: str, params: Mapping[str, Any], exc: BaseException) -> str:
    given = ", ".join(f"{key}={value!r}" for key, value in params.items()) or "none"
    reason = " ".join(str(exc).split()) or f"{type(exc).__name__} without a message"
    return f"Strategy {name!r} refused its parameters (strategy.params: {given}): {reason}"


_SIMPLE_TYPES = {bool: "a bool", int: "an int", float: "a float", str: "a str"}


def _typed_params(name: str, factory: StrategyFactory, params: dict[str, Any]) -> dict[str, Any]:
    """Check values against plain ``bool``/``int``/``float``/``str`` annotations.

    YAML gives ints where floats are meant (``eta: 1``); they are converted. Other
    annotations (unions, callables) are passed through unchecked.
    """
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: skip the type check
        hints = {}
    checked = dict(params)
    for key, value in params.items():
        expected = hints.get(key)
        if expected not in _SIMPLE_TYPES:
            continue
        is_bool = isinstance(value, bool)
        if expected is float and isinstance(value, int) and not is_bool:
            checked[key] = float(value)
        elif not isinstance(value, expected) or (expected is not bool and is_bool):
            raise StrategyError(
                f"The {key!r} parameter of strategy {name!r} (strategy.params.{key}) must be "
                f"{_SIMPLE_TYPES[expected]}. Got {value!r} instead."
            )
    return checked


#: Ranges of Flower's own strategy arguments (FedOpt family, FedAvgM), which Flower does not check.
_FLOWER_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "eta": (lambda v: v > 0, "a number > 0 (the server learning rate)"),
    "tau": (lambda v: v > 0, "a number > 0 (the adaptivity constant)"),
    "beta_1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "beta_2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "server_learning_rate": (lambda v: v > 0, "a number > 0"),
    "server_momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


# Flower's own strategies, by name (create_strategy adds medfed's reply checks).
# medfed's plug-ins (fedavg, fedprox, fedbn, fedld, fairlora) register themselves.
for _name, _cls in {
    "fedadagrad": flwr_strategy.FedAdagrad,
    "fedadam": flwr_strategy.FedAdam,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedmedian": flwr_strategy.FedMedian,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "fedyogi": flwr_strategy.FedYogi,
}.items():
    register_strategy(_name)(_cls)
del _name, _cls
