"""Tests for medfed.strategies.FedAvg: Flower's FedAvg minus broken replies."""

import logging

import numpy as np
import pytest
from flwr.serverapp import strategy as flwr_strategy

from medfed.strategies import FedAvg


def _numpy(record):
    return {key: array.numpy() for key, array in record.items()}


def _three_replies(make_reply):
    # Weights 1, 2, 1 -> factors 1/4, 1/2, 1/4.
    return [
        make_reply(11, {"w": np.array([0.0, 4.0]), "b": np.array(8.0)}, 1, {"loss": 4.0}),
        make_reply(12, {"w": np.array([2.0, 2.0]), "b": np.array(0.0)}, 2, {"loss": 2.0}),
        make_reply(13, {"w": np.array([4.0, 0.0]), "b": np.array(4.0)}, 1, {"loss": 0.0}),
    ]


def test_weighted_average_matches_hand_computation(make_reply):
    # Prepare
    strategy = FedAvg()

    # Execute
    arrays, metrics = strategy.aggregate_train(1, _three_replies(make_reply))

    # Assert: w = [0*1 + 2*2 + 4*1, 4*1 + 2*2 + 0*1] / 4 = [2, 2];
    # b = (8 + 0 + 4) / 4 = 3; loss = (4 + 4 + 0) / 4 = 2.
    result = _numpy(arrays)
    np.testing.assert_allclose(result["w"], [2.0, 2.0])
    np.testing.assert_allclose(result["b"], 3.0)
    assert dict(metrics) == pytest.approx({"loss": 2.0})
    assert dict(strategy.dropped_replies) == {}


def test_nan_reply_is_dropped_and_the_rest_averaged(make_reply, flwr_records):
    # Prepare
    replies = _three_replies(make_reply)
    replies.append(make_reply(14, {"w": np.array([np.nan, 1.0]), "b": np.array(1.0)}, 100, {"loss": 9.0}))
    strategy = FedAvg()

    # Execute
    arrays, metrics = strategy.aggregate_train(3, replies)

    # Assert: same result as without node 14.
    result = _numpy(arrays)
    np.testing.assert_allclose(result["w"], [2.0, 2.0])
    np.testing.assert_allclose(result["b"], 3.0)
    assert dict(metrics) == pytest.approx({"loss": 2.0})
    assert dict(strategy.dropped_replies) == {14: "array 'w' holds 1 NaN/inf value"}
    warnings = [r.getMessage() for r in flwr_records.records if r.levelno == logging.WARNING]
    assert warnings == [
        "aggregate_train: round 3: dropping the reply of node 14: "
        "array 'w' holds 1 NaN/inf value."
    ]


def test_flowers_fedavg_would_spread_the_nan(make_reply):
    # Why the override exists: the same replies poison Flower's plain average.
    replies = _three_replies(make_reply)
    replies.append(make_reply(14, {"w": np.array([np.nan, 1.0]), "b": np.array(1.0)}, 100, {"loss": 9.0}))

    arrays, _ = flwr_strategy.FedAvg().aggregate_train(1, replies)

    assert np.isnan(arrays["w"].numpy()[0])


def test_inf_and_mismatched_shape_replies_are_dropped(make_reply):
    # Prepare
    replies = _three_replies(make_reply)
    replies.append(make_reply(15, {"w": np.array([np.inf, 0.0]), "b": np.array(0.0)}, 5, {"loss": 1.0}))
    replies.append(make_reply(16, {"w": np.array([1.0, 1.0, 1.0]), "b": np.array(0.0)}, 5, {"loss": 1.0}))

    # Execute
    strategy = FedAvg()
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    np.testing.assert_allclose(_numpy(arrays)["w"], [2.0, 2.0])
    assert sorted(strategy.dropped_replies) == [15, 16]
    assert strategy.dropped_replies[16] == (
        "its arrays differ from the other replies': array 'w' has shape (3,), expected (2,)"
    )


def test_error_replies_are_left_to_flower(make_reply, make_error_reply, flwr_records):
    replies = [*_three_replies(make_reply), make_error_reply(17)]

    arrays, _ = FedAvg().aggregate_train(1, replies)

    np.testing.assert_allclose(_numpy(arrays)["w"], [2.0, 2.0])
    assert "Received error in reply from node 17" in flwr_records.text


def test_no_valid_reply_keeps_the_global_arrays(make_reply, make_error_reply, flwr_records):
    # Prepare
    replies = [
        make_reply(21, {"w": np.array([np.nan])}, 1),
        make_reply(22, {"w": np.array([np.inf])}, 1),
        make_error_reply(23),
    ]
    strategy = FedAvg()

    # Execute
    result = strategy.aggregate_train(2, replies)

    # Assert: (None, None) makes Strategy.start keep the previous arrays.
    assert result == (None, None)
    assert sorted(strategy.dropped_replies) == [21, 22]
    assert (
        "aggregate_train: round 2: no valid reply left after dropping 2; the global "
        "arrays stay unchanged this round."
    ) in flwr_records.text


def test_dropped_replies_resets_every_round(make_reply):
    strategy = FedAvg()
    strategy.aggregate_train(1, [make_reply(1, {"w": np.array([np.nan])}), make_reply(2, {"w": np.ones(1)})])

    strategy.aggregate_train(2, [make_reply(1, {"w": np.ones(1)}), make_reply(2, {"w": np.ones(1)})])

    assert dict(strategy.dropped_replies) == {}
