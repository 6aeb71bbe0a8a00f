"""What a strategy keeps between rounds, as named arrays a checkpoint can hold.

Flower's ``Strategy.start`` has no start-round argument: a resumed run starts a fresh
strategy on the checkpoint's arrays. Server optimisers keep more than the global model,
so a resumed FedAdam would restart its moments from zero and drift from the run it
continues. :func:`strategy_state` captures that extra state and
:func:`load_strategy_state` puts it back, so the resumed run continues bit-exactly.

Where the state comes from, first match wins:

1. **The strategy's own** ``state_dict() -> Mapping[str, np.ndarray]`` and
   ``load_state_dict(state)``. This is the extension point for medfed's stateful
   strategies (FedLD, FairLoRA, ...): define both methods and nothing here changes.
2. **Flower's FedOpt family** (``FedAdam``, ``FedYogi``, ``FedAdagrad``, ``FedOpt``):
   the attributes ``current_arrays``, ``m_t`` and ``v_t`` (each ``dict[str, NDArray]``
   or None), saved as ``"current_arrays/<name>"``, ``"m_t/<name>"``, ``"v_t/<name>"``.
3. **Flower's FedAvgM**: ``current_arrays`` (an ``ArrayRecord`` or None) and
   ``momentum_vector`` (a list of arrays or None). FedAvgM pairs them with the
   aggregate by position, so the keys carry it: ``"current_arrays/000003/<name>"`` and
   ``"momentum_vector/000003"``.
4. Anything else keeps no state between rounds (FedAvg, FedProx, FedMedian, ...) and
   gives ``{}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

# Not re-exported by flwr.serverapp.strategy, but the base of FedAdam/FedYogi/FedAdagrad
# that owns their state (flwr is pinned to 1.42.0).
from flwr.serverapp.strategy.fedopt import FedOpt

from medfed.errors import MedfedError

__all__ = ["StrategyStateError", "load_strategy_state", "strategy_state"]


class StrategyStateError(MedfedError):
    """Saved strategy state does not fit the strategy it is loaded into."""


# Attribute -> container kind, per strategy family. "dict": name -> array;
# "record": an ordered ArrayRecord; "list": an ordered list of arrays.
_LAYOUTS: tuple[tuple[type, dict[str, str]], ...] = (
    (FedOpt, {"current_arrays": "dict", "m_t": "dict", "v_t": "dict"}),
    (flwr_strategy.FedAvgM, {"current_arrays": "record", "momentum_vector": "list"}),
)


def strategy_state(strategy: Strategy, *, copy: bool = True) -> dict[str, np.ndarray]:
    """Everything ``strategy`` carries from one round to the next.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
    copy : bool
        Copy the arrays (False: views of the strategy's own, to read at once, e.g. to
        check that they are finite without doubling a large state in memory).

    Returns
    -------
    dict[str, np.ndarray]
        ``"<attribute>/<array name>"`` -> C-contiguous copy, dtype and shape kept (see
        the module docstring for each family's keys); ``{}`` for a stateless strategy
        or before the first aggregation.
    """
    if callable(getattr(strategy, "state_dict", None)):
        return {key: _copy(value) if copy else np.asarray(value) for key, value in strategy.state_dict().items()}
    state: dict[str, np.ndarray] = {}
    for attribute, kind in _layout(strategy).items():
        value = getattr(strategy, attribute, None)
        if value is None:
            continue
        if kind == "dict":
            items = {f"{attribute}/{name}": array for name, array in value.items()}
        elif kind == "record":
            items = {
                f"{attribute}/{index:06d}/{name}": array.numpy()
                for index, (name, array) in enumerate(value.items())
            }
        else:
            items = {f"{attribute}/{index:06d}": array for index, array in enumerate(value)}
        state.update({key: _copy(array) if copy else np.asarray(array) for key, array in items.items()})
    return state


def load_strategy_state(strategy: Strategy, state: Mapping[str, np.ndarray]) -> None:
    """Put state from :func:`strategy_state` back into a freshly built ``strategy``.

    Attributes the state has no entry for are reset to None, as in a new strategy.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        Same class and parameters as the strategy the state came from.
    state : Mapping[str, np.ndarray]
        As returned by :func:`strategy_state` (e.g. read back from a checkpoint).

    Raises
    ------
    StrategyStateError
        If a key does not belong to this kind of strategy, e.g. the checkpoint was
        written by a run with another strategy.
    """
    name = type(strategy).__name__
    if callable(getattr(strategy, "state_dict", None)):
        if not callable(getattr(strategy, "load_state_dict", None)):
            raise StrategyStateError(
                f"{name} defines state_dict() but not load_state_dict(); define both to "
                "resume it."
            )
        strategy.load_state_dict({key: _copy(value) for key, value in state.items()})
        return

    layout = _layout(strategy)
    grouped: dict[str, dict[str, np.ndarray]] = {attribute: {} for attribute in layout}
    for key, value in state.items():
        attribute, sep, rest = key.partition("/")
        if attribute not in layout or not sep or not rest:
            expected = (
                "keys starting with " + ", ".join(f"'{a}/'" for a in layout)
                if layout
                else "no state (it keeps none between rounds)"
            )
            raise StrategyStateError(
                f"Strategy state key {key!r} does not fit {name}, which expects "
                f"{expected}. Was the checkpoint written by a run with another strategy?"
            )
        grouped[attribute][rest] = _copy(value)

    for attribute, kind in layout.items():
        entries = grouped[attribute]
        setattr(strategy, attribute, _rebuild(kind, entries, attribute, name) if entries else None)


def _layout(strategy: Strategy) -> dict[str, str]:
    for cls, layout in _LAYOUTS:
        if isinstance(strategy, cls):
            return layout
    return {}


def _copy(array: Any) -> np.ndarray:
    return np.array(array, copy=True, order="C")


def _rebuild(kind: str, entries: dict[str, np.ndarray], attribute: str, name: str) -> Any:
    if kind == "dict":
        return entries
    ordered: list[tuple[int, str, np.ndarray]] = []
    for rest, array in entries.items():
        index, _, array_name = rest.partition("/")
        if not index.isdigit() or (kind == "record") != bool(array_name):
            form = "<index>/<name>" if kind == "record" else "<index>"
            raise StrategyStateError(
                f"Strategy state key '{attribute}/{rest}' of {name} must have the form "
                f"'{attribute}/{form}'."
            )
        ordered.append((int(index), array_name, array))
    ordered.sort(key=lambda item: item[0])
    if kind == "record":
        return ArrayRecord({array_name: Array(array) for _, array_name, array in ordered})
    return [array for _, _, array in ordered]
