"""Reply Messages for strategy tests, built with Flower's public record and message types."""

import logging
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)


def _reply_metadata(node_id: int, server_round: int) -> Metadata:
    # What the SuperLink would stamp on a node's reply to a training instruction.
    return Metadata(
        run_id=1,
        message_id=f"reply-{node_id}-{server_round}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"instruction-{node_id}-{server_round}",
        group_id=str(server_round),
        created_at=0.0,
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )


def build_reply(
    node_id: int,
    arrays: Mapping[str, np.ndarray] | None,
    num_examples: float | None = 10,
    metrics: Mapping[str, float] | None = None,
    server_round: int = 1,
) -> Message:
    """A training reply from ``node_id`` carrying ``arrays`` and its metrics.

    ``arrays=None`` leaves the ArrayRecord out; ``num_examples=None`` leaves the
    weight key out.
    """
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    values = dict(metrics or {})
    if num_examples is not None:
        values["num-examples"] = num_examples
    content["metrics"] = MetricRecord(values)
    return Message(content=content, metadata=_reply_metadata(node_id, server_round))


def build_error_reply(node_id: int, server_round: int = 1) -> Message:
    """A reply that reports a failure on ``node_id`` instead of content."""
    return Message(
        error=Error(code=5, reason="node unavailable"),
        metadata=_reply_metadata(node_id, server_round),
    )


@pytest.fixture
def make_reply() -> Callable[..., Message]:
    return build_reply


@pytest.fixture
def make_error_reply() -> Callable[..., Message]:
    return build_error_reply


@pytest.fixture
def flwr_records(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    """caplog that sees the 'flwr' logger even after Flower turned its propagation off."""
    monkeypatch.setattr(logging.getLogger("flwr"), "propagate", True)
    caplog.set_level(logging.INFO, logger="flwr")
    return caplog
