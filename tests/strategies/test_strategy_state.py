"""Tests for medfed.strategies.state: a resumed strategy continues bit-exactly."""

from unittest.mock import Mock

import numpy as np
import pytest
import safetensors.numpy
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.supercore.task_identity import TaskIdentity

from medfed.strategies import (
    FedAvg,
    StrategyStateError,
    create_strategy,
    load_strategy_state,
    strategy_state,
)

NODES = (11, 12, 13)


@pytest.fixture
def grid(monkeypatch):
    """A Grid with three connected nodes.

    configure_train builds instruction Messages, which read the task identity that
    Flower's runtime sets for a ServerApp process; tests set it by hand.
    """
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    fake = Mock(spec=Grid)
    fake.get_node_ids.return_value = list(NODES)
    return fake


def _global_arrays(seed):
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=(4,)).astype(np.float32),
        "head.weight": rng.normal(size=(2, 4)).astype(np.float32),
    }


@pytest.fixture
def run_round(grid, make_reply):
    """Configure and aggregate one round; the sites move the arrays by seeded noise."""

    def run(strategy, server_round, global_arrays, seed):
        record = ArrayRecord({k: Array(v) for k, v in global_arrays.items()})
        list(strategy.configure_train(server_round, record, ConfigRecord(), grid))
        rng = np.random.default_rng(seed)
        replies = [
            make_reply(
                node,
                {
                    k: (v + rng.normal(scale=0.1, size=v.shape)).astype(v.dtype)
                    for k, v in global_arrays.items()
                },
                num_examples=10 * (i + 1),
                metrics={"loss": float(i)},
                server_round=server_round,
            )
            for i, node in enumerate(NODES)
        ]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        return {k: a.numpy() for k, a in arrays.items()}

    return run


def _assert_bit_equal(left, right, *, same_order=True):
    assert (list(left) if same_order else sorted(left)) == (
        list(right) if same_order else sorted(right)
    )
    for key in left:
        assert left[key].dtype == right[key].dtype, key
        assert left[key].shape == right[key].shape, key
        assert left[key].tobytes() == right[key].tobytes(), key


@pytest.mark.parametrize(
    ("name", "params", "attributes"),
    [
        ("fedadam", {"eta": 0.05}, {"current_arrays", "m_t", "v_t"}),
        ("fedyogi", {}, {"current_arrays", "m_t", "v_t"}),
        ("fedadagrad", {}, {"current_arrays", "m_t", "v_t"}),
        ("fedavgm", {"server_momentum": 0.9}, {"current_arrays", "momentum_vector"}),
    ],
)
def test_resumed_strategy_continues_bit_exactly(run_round, name, params, attributes):
    # Prepare: round 1 on the original strategy, then a checkpoint of its state that
    # goes through safetensors as the real checkpoint does. A checkpoint may hand the
    # keys back in any order: reverse them to make sure nothing depends on it.
    original = create_strategy(name, params, num_sites=3)
    after_round_1 = run_round(original, 1, _global_arrays(0), seed=1)
    saved = safetensors.numpy.load(safetensors.numpy.save(strategy_state(original)))
    saved = dict(reversed(list(saved.items())))
    resumed = create_strategy(name, params, num_sites=3)
    fresh = create_strategy(name, params, num_sites=3)

    # Execute
    load_strategy_state(resumed, saved)
    expected = run_round(original, 2, after_round_1, seed=2)
    got = run_round(resumed, 2, after_round_1, seed=2)
    without_state = run_round(fresh, 2, after_round_1, seed=2)

    # Assert
    assert {key.split("/")[0] for key in saved} == attributes
    _assert_bit_equal(got, expected)
    _assert_bit_equal(strategy_state(resumed), strategy_state(original), same_order=False)
    # The state matters: a fresh strategy on the same inputs goes elsewhere.
    assert not all(np.array_equal(without_state[k], expected[k]) for k in expected)


def test_fedadam_state_keys_name_attribute_and_array(run_round):
    strategy = create_strategy("fedadam", {}, num_sites=3)
    run_round(strategy, 1, _global_arrays(0), seed=1)

    state = strategy_state(strategy)

    names = ["conv.weight", "conv.bias", "head.weight"]
    assert sorted(state) == sorted(f"{a}/{n}" for a in ("current_arrays", "m_t", "v_t") for n in names)
    np.testing.assert_array_equal(state["m_t/conv.bias"], strategy.m_t["conv.bias"])


def test_state_is_a_copy(run_round):
    strategy = create_strategy("fedadam", {}, num_sites=3)
    run_round(strategy, 1, _global_arrays(0), seed=1)
    state = strategy_state(strategy)
    before = state["v_t/conv.bias"].copy()

    strategy.v_t["conv.bias"] += 1.0

    np.testing.assert_array_equal(state["v_t/conv.bias"], before)


def test_fresh_fedopt_strategy_has_empty_state_and_loading_empty_resets_it(run_round):
    strategy = create_strategy("fedyogi", {}, num_sites=3)
    assert strategy_state(strategy) == {}
    run_round(strategy, 1, _global_arrays(0), seed=1)

    load_strategy_state(strategy, {})

    assert strategy.m_t is None and strategy.v_t is None and strategy.current_arrays is None


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedmedian"])
def test_stateless_strategies_give_empty_state(name):
    assert strategy_state(create_strategy(name, {}, num_sites=3)) == {}


def test_loading_foreign_state_names_the_key_and_the_strategy():
    with pytest.raises(StrategyStateError) as info:
        load_strategy_state(FedAvg(), {"m_t/w": np.zeros(2)})

    assert str(info.value) == (
        "Strategy state key 'm_t/w' does not fit FedAvg, which expects no state (it keeps "
        "none between rounds). Was the checkpoint written by a run with another strategy?"
    )


def test_loading_unknown_attribute_into_fedadam_fails():
    with pytest.raises(StrategyStateError, match="^Strategy state key 'momentum_vector/000000' does not fit FedAdam"):
        load_strategy_state(flwr_strategy.FedAdam(), {"momentum_vector/000000": np.zeros(2)})


def test_malformed_positional_key_fails():
    with pytest.raises(StrategyStateError, match="must have the form 'momentum_vector/<index>'"):
        load_strategy_state(flwr_strategy.FedAvgM(), {"momentum_vector/first": np.zeros(2)})


class _CountingAvg(flwr_strategy.FedAvg):
    """A strategy with its own state methods (the FedLD/FairLoRA extension point)."""

    def __init__(self):
        super().__init__()
        self.rounds_seen = np.array(0)
        # Attributes with FedOpt's names must not be picked up instead of state_dict().
        self.m_t = {"w": np.ones(1)}

    def state_dict(self):
        return {"rounds_seen": self.rounds_seen}

    def load_state_dict(self, state):
        self.rounds_seen = state["rounds_seen"]


class _SaveOnly(flwr_strategy.FedAvg):
    def state_dict(self):
        return {}


def test_strategys_own_state_methods_take_precedence():
    source = _CountingAvg()
    source.rounds_seen = np.array(7)
    target = _CountingAvg()

    load_strategy_state(target, strategy_state(source))

    assert strategy_state(source) == {"rounds_seen": np.array(7)}
    assert int(target.rounds_seen) == 7


def test_state_dict_without_load_state_dict_cannot_be_resumed():
    with pytest.raises(StrategyStateError, match="^_SaveOnly defines state_dict\\(\\) but not load_state_dict\\(\\)"):
        load_strategy_state(_SaveOnly(), {})
