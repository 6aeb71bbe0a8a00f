"""Strategy plug-ins for medfed, built on Flower's Message API.

A strategy is one plug-in with a server half (a Flower strategy with medfed's reply
checks, :class:`~medfed.strategies.base.MedfedStrategy`) and a client half
(:class:`~medfed.strategies.hooks.ClientHooks`), registered under one name:

- :func:`create_strategy` builds a strategy by name (:func:`list_strategies`) or by
  ``"package.module:ClassName"``, sized for the federation; :func:`client_hooks_for`
  gives its client half.
- :func:`register_strategy` adds a name; medfed's plug-ins register themselves:
  ``fedavg``, ``fedprox``, ``fedbn``, ``fedld``, ``fairlora`` and ``local`` (no federation).
- :func:`strategy_state` / :func:`load_strategy_state` save and restore what a
  strategy keeps between rounds, for bit-exact resume.
"""

from . import fairlora, fedbn, fedld, fedprox, local
from .base import MedfedStrategy, ReplyPolicy
from .fairlora import FairLoRA
from .fedavg import FedAvg
from .fedbn import FedBN
from .fedld import FedLD, principal_gradient_aggregate
from .fedprox import FedProx
from .hooks import ClientHooks, ModelSpec
from .registry import StrategyError, client_hooks_for, create_strategy, list_strategies, register_strategy
from .state import StrategyStateError, load_strategy_state, strategy_state

__all__ = [
    "ClientHooks",
    "FairLoRA",
    "FedAvg",
    "FedBN",
    "FedLD",
    "FedProx",
    "MedfedStrategy",
    "ModelSpec",
    "ReplyPolicy",
    "StrategyError",
    "StrategyStateError",
    "client_hooks_for",
    "create_strategy",
    "list_strategies",
    "load_strategy_state",
    "principal_gradient_aggregate",
    "register_strategy",
    "strategy_state",
]
