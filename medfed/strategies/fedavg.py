"""FedAvg that leaves out broken training replies instead of failing on them.

Federated Averaging (McMahan et al., 2017, https://arxiv.org/abs/1602.05629) as
implemented by Flower's ``flwr.serverapp.strategy.FedAvg``, with medfed's reply checks
(:class:`~medfed.strategies.base.MedfedStrategy`): before averaging, replies that
cannot be averaged safely are dropped with a WARNING naming the node and the reason
(see :func:`~medfed.strategies._validation.find_invalid_replies`): arrays holding
NaN/inf (a diverged site would make the global model NaN), array names, shapes or
dtypes that differ from most replies (Flower would stop the run with
``InconsistentMessageReplies``), a missing or non-positive weight, not exactly one
ArrayRecord and one MetricRecord, or an update norm far above the others'.

When no reply is left, ``aggregate_train`` returns ``(None, None)``, Flower's own value
for "nothing to aggregate": ``Strategy.start`` then keeps the previous global arrays,
records no training metrics for that round, and goes on to evaluation and the next
round. A WARNING says so, and :attr:`FedAvg.dropped_replies` tells the server which
nodes were left out. (If it happens in round 1, ``Result.arrays`` stays empty until a
later round aggregates.)
"""

from __future__ import annotations

from flwr.serverapp import strategy as flwr_strategy

from .base import MedfedStrategy
from .registry import register_strategy

__all__ = ["FedAvg"]


@register_strategy("fedavg")
class FedAvg(MedfedStrategy, flwr_strategy.FedAvg):
    """Flower's FedAvg, minus replies with non-finite, mismatched or outlying arrays.

    Takes exactly the constructor arguments of ``flwr.serverapp.strategy.FedAvg``.
    """
