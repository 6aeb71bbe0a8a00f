"""Server optimisers average BatchNorm's running statistics and counters, never step them."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from medfed.simulation.local import _ensure_task_identity
from medfed.strategies import create_strategy, load_strategy_state, strategy_state

COUNTS = [10, 30, 60]
#: Each site's running variance, ~0.02 (images with other intensity statistics than the
#: initial model's variance of 1), and how many batches it adds to the counter per round.
SITE_VAR = [0.018, 0.02, 0.025]
SITE_BATCHES = [50, 100, 200]


class _ThreeNodes:
    """Just enough of a Grid for configure_train: three nodes, messages built locally."""

    def __init__(self):
        _ensure_task_identity()  # Flower 1.42 stamps new Messages with the task identity

    def get_node_ids(self):
        return [11, 12, 13]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)


def _initial():
    return {"conv.weight": np.zeros(3, np.float32), "bn.weight": np.ones(2, np.float32),
            "bn.running_mean": np.zeros(2, np.float32), "bn.running_var": np.ones(2, np.float32),
            "bn.num_batches_tracked": np.array(0, np.int64)}


def _round(strategy, server_round, arrays, make_reply):
    """Configure and aggregate one round as the server does; the new global arrays."""
    list(strategy.configure_train(server_round, arrays, ConfigRecord(), _ThreeNodes()))
    current = {name: array.numpy() for name, array in arrays.items()}
    replies = []
    for i, (var, batches, count) in enumerate(zip(SITE_VAR, SITE_BATCHES, COUNTS, strict=True)):
        sent = {
            "conv.weight": current["conv.weight"] + 0.01 * (i + 1),
            "bn.weight": current["bn.weight"] - 0.01,
            "bn.running_mean": np.full(2, 0.1 * (i + 1), np.float32),
            "bn.running_var": np.full(2, var, np.float32),
            "bn.num_batches_tracked": current["bn.num_batches_tracked"] + batches,
        }
        replies.append(make_reply(11 + i, sent, count, {"loss": 1.0}, server_round=server_round))
    new, _ = strategy.aggregate_train(server_round, replies)
    assert new is not None, strategy.model_kept
    return new


def _weighted(values):
    return sum(v * c for v, c in zip(values, COUNTS, strict=True)) / sum(COUNTS)


@pytest.mark.parametrize(("name", "params", "rounds"), [
    ("fedavgm", {"server_momentum": 0.9}, 2),
    ("fedadam", {}, 15),
    ("fedyogi", {}, 15),
    ("fedadagrad", {}, 15),
])
def test_running_statistics_and_counters_take_the_example_weighted_mean(name, params, rounds, make_reply):
    # Prepare: the global running variance is 1; the sites send ~0.02 every round. A
    # server optimiser stepping it as a weight overshoots below zero (FedAvgM with
    # momentum 0.9 in round 2, FedAdam at its default eta by round 12): NaN in BatchNorm.
    strategy = create_strategy(name, params, num_sites=3)
    arrays = ArrayRecord({k: Array(v) for k, v in _initial().items()})
    counter = 0
    for server_round in range(1, rounds + 1):
        # Execute
        arrays = _round(strategy, server_round, arrays, make_reply)
        counter = int(np.rint(_weighted([counter + b for b in SITE_BATCHES])))
        # Assert
        assert (arrays["bn.running_var"].numpy() >= 0).all(), server_round
        np.testing.assert_allclose(arrays["bn.running_var"].numpy(), _weighted(SITE_VAR), rtol=1e-6)
        np.testing.assert_allclose(arrays["bn.running_mean"].numpy(), _weighted([0.1, 0.2, 0.3]), rtol=1e-6)
        assert arrays["bn.num_batches_tracked"].dtype == "int64"
        assert int(arrays["bn.num_batches_tracked"].numpy()) == counter, server_round
    # The weights are still the server optimiser's: not the sites' mean.
    mean_weight = _weighted([0.01, 0.02, 0.03]) * rounds
    assert not np.allclose(arrays["conv.weight"].numpy(), mean_weight)


@pytest.mark.parametrize(("name", "params"), [("fedavgm", {"server_momentum": 0.9}), ("fedadam", {})])
def test_the_optimisers_copy_holds_the_means_and_its_moments_stay_zero_there(name, params, make_reply):
    strategy = create_strategy(name, params, num_sites=3)
    arrays = ArrayRecord({k: Array(v) for k, v in _initial().items()})
    for server_round in (1, 2, 3):
        arrays = _round(strategy, server_round, arrays, make_reply)
    state = strategy_state(strategy)
    statistics = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
    if name == "fedavgm":
        # Its copy of the current arrays is what it steps from next round.
        current = strategy.current_arrays
        for key in statistics:
            np.testing.assert_array_equal(current[key].numpy(), arrays[key].numpy())
        momenta = [state[f"momentum_vector/{i:06d}"] for i, key in enumerate(current) if key in statistics]
    else:
        momenta = [state[f"{moment}/{key}"] for moment in ("m_t", "v_t") for key in statistics]
        assert np.any(state["m_t/conv.weight"] != 0)
    assert all(not np.any(m) for m in momenta)


def test_the_statistics_are_fedavgs_bit_for_bit(make_reply):
    # Same replies: FedAdam's running statistics and counter are FedAvg's, the same arithmetic.
    results = {}
    for name in ("fedavg", "fedadam"):
        strategy = create_strategy(name, {}, num_sites=3)
        results[name] = _round(strategy, 1, ArrayRecord({k: Array(v) for k, v in _initial().items()}), make_reply)
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        np.testing.assert_array_equal(results["fedadam"][key].numpy(), results["fedavg"][key].numpy())
    assert not np.array_equal(results["fedadam"]["conv.weight"].numpy(), results["fedavg"]["conv.weight"].numpy())


@pytest.mark.parametrize(("name", "params"), [("fedavgm", {"server_momentum": 0.9}), ("fedadam", {})])
def test_a_server_optimiser_resumed_from_its_saved_state_continues_bit_exactly(name, params, make_reply):
    strategy = create_strategy(name, params, num_sites=3)
    arrays = ArrayRecord({k: Array(v) for k, v in _initial().items()})
    arrays = _round(strategy, 1, arrays, make_reply)
    # What a checkpoint holds after round 1: the global arrays and the strategy's state.
    saved_arrays, saved_state = arrays, strategy_state(strategy)
    straight = _round(strategy, 3, _round(strategy, 2, arrays, make_reply), make_reply)
    resumed = create_strategy(name, params, num_sites=3)
    load_strategy_state(resumed, saved_state)
    again = _round(resumed, 3, _round(resumed, 2, saved_arrays, make_reply), make_reply)
    for key in straight:
        np.testing.assert_array_equal(again[key].numpy(), straight[key].numpy())
