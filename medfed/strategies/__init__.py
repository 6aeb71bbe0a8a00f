"""Server-side aggregation strategies for medfed, built on Flower's Message API.

- :func:`create_strategy` builds a strategy by name (:func:`list_strategies`) or by
  ``"package.module:ClassName"``, sized for the federation.
- :func:`register_strategy` adds a name; medfed's strategies register themselves.
- :class:`FedAvg` is Flower's FedAvg that drops non-finite or mismatched replies.
- :func:`strategy_state` / :func:`load_strategy_state` save and restore what a
  strategy keeps between rounds, for bit-exact resume.
"""

from .fedavg import FedAvg
from .registry import StrategyError, create_strategy, list_strategies, register_strategy
from .state import StrategyStateError, load_strategy_state, strategy_state

__all__ = [
    "FedAvg",
    "StrategyError",
    "StrategyStateError",
    "create_strategy",
    "list_strategies",
    "load_strategy_state",
    "register_strategy",
    "strategy_state",
]
