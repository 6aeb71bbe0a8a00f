"""A Strategy that hands every call to another Strategy: the base of medfed's strategy wrappers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["DelegatingStrategy"]


class DelegatingStrategy(Strategy):
    """Delegates every :class:`flwr.serverapp.strategy.Strategy` method, and every attribute
    it lacks (``fraction_train``, ``dropped_replies``...), to ``strategy``; subclasses
    override only what they change (quorum, round offset).

    ``start`` is Flower's own loop, which calls the methods below on this wrapper.

    Parameters
    ----------
    strategy : Strategy
        The experiment's strategy, or another wrapper.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes the wrapper lacks; guarded for copy/pickle, which
        # look attributes up before __init__ has run.
        strategy = self.__dict__.get("strategy")
        if strategy is None:
            raise AttributeError(name)
        return getattr(strategy, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
