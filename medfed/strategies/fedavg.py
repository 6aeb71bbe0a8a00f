"""FedAvg that leaves out broken training replies instead of failing on them.

Federated Averaging (McMahan et al., 2017, https://arxiv.org/abs/1602.05629) as
implemented by Flower's ``flwr.serverapp.strategy.FedAvg``, with one change: before
averaging, replies that cannot be averaged safely are dropped with a WARNING naming the
node and the reason (see :func:`~medfed.strategies._validation.find_invalid_replies`):
arrays holding NaN/inf (a diverged site would make the global model NaN), array names
or shapes that differ from most replies (Flower would stop the run with
``InconsistentMessageReplies``), a missing or non-positive weight, or not exactly one
ArrayRecord and one MetricRecord.

When no reply is left, ``aggregate_train`` returns ``(None, None)``, Flower's own value
for "nothing to aggregate": ``Strategy.start`` then keeps the previous global arrays,
records no training metrics for that round, and goes on to evaluation and the next
round. A WARNING says so, and :attr:`FedAvg.dropped_replies` tells the server which
nodes were left out. (If it happens in round 1, ``Result.arrays`` stays empty until a
later round aggregates.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import WARNING
from types import MappingProxyType

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import strategy as flwr_strategy

from ._validation import find_invalid_replies
from .registry import register_strategy

__all__ = ["FedAvg"]


@register_strategy("fedavg")
class FedAvg(flwr_strategy.FedAvg):
    """Flower's FedAvg, minus replies with non-finite or mismatched arrays.

    Takes exactly the constructor arguments of ``flwr.serverapp.strategy.FedAvg``.

    Attributes
    ----------
    dropped_replies : Mapping[int, str]
        Node id -> reason, for the replies the latest ``aggregate_train`` call left
        out; empty when none were.
    """

    dropped_replies: Mapping[int, str] = MappingProxyType({})

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid replies with a WARNING, then average the rest as Flower does.

        Parameters
        ----------
        server_round : int
            Current round, from 1.
        replies : Iterable[Message]
            Replies of the sampled nodes; error replies are passed on to Flower, which
            logs and skips them.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The sample-weighted averages, or ``(None, None)`` when no valid reply is
            left (the global arrays then stay as they were).
        """
        replies = list(replies)
        answered = [msg for msg in replies if not msg.has_error()]
        invalid = find_invalid_replies([msg.content for msg in answered], self.weighted_by_key)

        dropped: dict[int, str] = {}
        for index, reason in invalid.items():
            node_id = answered[index].metadata.src_node_id
            dropped[node_id] = reason
            log(
                WARNING,
                "aggregate_train: round %s: dropping the reply of node %s: %s.",
                server_round,
                node_id,
                reason,
            )
        # An instance attribute shadows the empty class-level default.
        self.dropped_replies = MappingProxyType(dropped)

        if invalid and len(invalid) == len(answered):
            log(
                WARNING,
                "aggregate_train: round %s: no valid reply left after dropping %s; the "
                "global arrays stay unchanged this round.",
                server_round,
                len(invalid),
            )
        dropped_messages = {id(answered[index]) for index in invalid}
        kept = [msg for msg in replies if id(msg) not in dropped_messages]
        return super().aggregate_train(server_round, kept)
