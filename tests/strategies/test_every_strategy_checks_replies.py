"""Every registered strategy drops bad replies the same way (medfed's MedfedStrategy checks)."""


import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from medfed.simulation.local import _ensure_task_identity
from medfed.strategies import MedfedStrategy, ReplyPolicy, create_strategy, list_strategies, strategy_state
from medfed.strategies._validation import clip_update, find_norm_outliers, update_norm

GLOBAL = {"w": np.array([0.0, 0.0], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}


class _FourNodes:
    """Just enough of a Grid for configure_train: four nodes, messages built locally."""

    def __init__(self):
        _ensure_task_identity()  # Flower 1.42 stamps new Messages with the task identity

    def get_node_ids(self):
        return [11, 12, 13, 14]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)


def _strategy(name: str, **kwargs) -> MedfedStrategy:
    strategy = create_strategy(name, {}, num_sites=4, **kwargs)
    # Round 2 is configured as the server would: the strategy sees the global arrays.
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(2, arrays, ConfigRecord(), _FourNodes()))
    return strategy


def _good(make_reply, node_id, w, weight=10):
    return make_reply(node_id, {"w": np.array(w, dtype=np.float32), "b": np.array([1.0], dtype=np.float32)},
                      weight, {"loss": 1.0}, server_round=2)


@pytest.mark.parametrize("name", list_strategies())
def test_a_nan_reply_is_dropped_by_every_registered_strategy(name, make_reply):
    # Prepare: three sane replies and one with a NaN.
    strategy = _strategy(name)
    replies = [_good(make_reply, 11, [1.0, 1.0]), _good(make_reply, 12, [1.2, 0.8]), _good(make_reply, 13, [0.9, 1.1])]
    replies.append(make_reply(14, {"w": np.array([np.nan, 1.0], dtype=np.float32),
                                   "b": np.array([1.0], dtype=np.float32)}, 10, {"loss": 1.0}, server_round=2))
    # Execute
    arrays, _ = strategy.aggregate_train(2, replies)
    # Assert
    assert isinstance(strategy, MedfedStrategy)
    assert dict(strategy.dropped_replies) == {14: "array 'w' holds 1 NaN/inf value"}
    assert arrays is not None and all(np.isfinite(a.numpy()).all() for a in arrays.values())


@pytest.mark.parametrize("name", list_strategies())
def test_finite_replies_whose_aggregate_overflows_leave_the_global_model_unchanged(name, make_reply):
    # Prepare: every reply is finite, but near float32's largest value: their sum is inf.
    strategy = _strategy(name)
    strategy.reply_policy = type(strategy.reply_policy)()  # no norm screening: the overflow must be caught after
    huge = float(np.finfo(np.float32).max) * 0.9
    replies = [_good(make_reply, node, [huge, huge]) for node in (11, 12, 13)]
    # Execute
    arrays, _ = strategy.aggregate_train(2, replies)
    # Assert: either the strategy's arithmetic stayed finite, or the round keeps the old model.
    assert arrays is None or all(np.isfinite(a.numpy()).all() for a in arrays.values())
    # ... and the state it carries on is as finite as before the round: FedAdam's second
    # moment and FedAvgM's momentum turned inf, which froze or stopped the model for good.
    state = strategy_state(strategy)
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f"), name
    if arrays is None:
        assert strategy.model_kept is not None
    again = [_good(make_reply, node, [1.0, 1.0]) for node in (11, 12, 13)]
    arrays, _ = strategy.aggregate_train(3, again)
    assert arrays is not None and all(np.isfinite(a.numpy()).all() for a in arrays.values()), name


@pytest.mark.parametrize("name", list_strategies())
def test_wrong_dtype_and_wrong_keys_are_dropped_by_every_registered_strategy(name, make_reply):
    # Prepare
    strategy = _strategy(name)
    replies = [_good(make_reply, 11, [1.0, 1.0]), _good(make_reply, 12, [1.2, 0.8]), _good(make_reply, 13, [0.9, 1.1])]
    replies.append(make_reply(14, {"w": np.array([1.0, 1.0]), "b": np.array([1.0], dtype=np.float32)}, 10,
                              {"loss": 1.0}, server_round=2))  # float64
    replies.append(make_reply(15, {"w": np.array([1.0, 1.0], dtype=np.float32)}, 10, {"loss": 1.0}, server_round=2))
    # Execute
    strategy.aggregate_train(2, replies)
    # Assert
    whole = not strategy.sends_partial_replies()  # else a subset may travel (FedBN)
    assert dict(strategy.dropped_replies) == {
        14: "array 'w' has dtype float64, the global model's float32",
        15: ("its arrays are not the whole global model: it lacks ['b']" if whole
             else "its arrays differ from the other replies': missing arrays ['b']"),
    }


@pytest.mark.parametrize("name", list_strategies())
def test_replies_lacking_arrays_cannot_outvote_the_whole_model(name, make_reply):
    # Two of three replies lacked 'b': the majority layout dropped the whole reply, and
    # Flower's FedOpt then stopped the run ("Keys of the aggregated arrays do not match").
    strategy = _strategy(name)
    partial = [make_reply(node, {"w": np.array([1.0, 1.0], dtype=np.float32)}, 10, {"loss": 1.0}, server_round=2)
               for node in (11, 12)]
    arrays, _ = strategy.aggregate_train(2, [*partial, _good(make_reply, 13, [1.0, 1.0])])
    if not strategy.sends_partial_replies():
        assert sorted(strategy.dropped_replies) == [11, 12]
    if arrays is not None:
        assert sorted(arrays) == ["b", "w"]


@pytest.mark.parametrize("name", list_strategies())
def test_with_two_replies_a_broken_one_loses_to_the_global_model_even_when_it_comes_first(name, make_reply):
    # Prepare: an unpackable reply keeps its packed blob (medfed.server.transfer); with two
    # replies the majority is a tie, which used to go to the first, broken, reply.
    strategy = _strategy(name)
    broken = make_reply(11, {"medfed.packed-arrays": np.zeros(8, np.uint8)}, 10, {"loss": 1.0}, server_round=2)
    replies = [broken, _good(make_reply, 12, [1.0, 1.0])]
    # Execute
    arrays, _ = strategy.aggregate_train(2, replies)
    # Assert: the broken reply is dropped and the global model keeps its own arrays.
    assert dict(strategy.dropped_replies) == {
        11: "its arrays are not the global model's: unexpected arrays ['medfed.packed-arrays']"}
    if arrays is not None:  # "local" aggregates nothing
        assert sorted(arrays) == ["b", "w"]


@pytest.mark.parametrize("name", list_strategies())
def test_with_two_replies_one_that_lacks_an_array_or_a_metric_loses_even_when_it_comes_first(name, make_reply):
    # Prepare: a reply without 'b' (all strategies here send the whole model), and one without 'loss'.
    no_b = make_reply(11, {"w": np.array([5.0, 5.0], dtype=np.float32)}, 10, {"loss": 1.0}, server_round=2)
    no_loss = make_reply(11, {"w": np.array([5.0, 5.0], dtype=np.float32), "b": np.array([5.0], dtype=np.float32)},
                         10, {}, server_round=2)
    strategy = _strategy(name)
    no_b_reason = ("its arrays are not the whole global model: it lacks ['b']"
                   if not strategy.sends_partial_replies()
                   else "its arrays differ from the other replies': missing arrays ['b']")
    for broken, reason in [(no_b, no_b_reason),
                           (no_loss, "its metrics differ from the other replies': missing ['loss']")]:
        strategy = _strategy(name)
        # Execute
        arrays, _ = strategy.aggregate_train(2, [broken, _good(make_reply, 12, [1.0, 1.0])])
        # Assert: the whole reply is aggregated, not the broken one.
        assert dict(strategy.dropped_replies) == {11: reason}
        if arrays is not None:  # "local" aggregates nothing
            assert 5.0 not in arrays["w"].numpy()


@pytest.mark.parametrize("name", list_strategies())
def test_a_reply_with_other_metric_names_is_dropped_not_fatal(name, make_reply, flwr_records):
    # Flower's metric aggregation raises on differing keys, which would end the run.
    strategy = _strategy(name)
    replies = [_good(make_reply, 11, [1.0, 1.0]), _good(make_reply, 12, [1.2, 0.8]),
               make_reply(13, {"w": np.array([0.9, 1.1], dtype=np.float32), "b": np.array([1.0], dtype=np.float32)},
                          10, {"loss": 1.0, "acc-group-0": 0.5}, server_round=2)]
    # Execute
    strategy.aggregate_train(2, replies)
    evaluated = strategy.aggregate_evaluate(2, [make_reply(11, None, 10, {"acc": 0.5}),
                                                make_reply(12, None, 10, {"acc": 0.7}),
                                                make_reply(13, None, 10, {"acc": 0.9, "extra": 1.0})])
    # Assert
    assert dict(strategy.dropped_replies) == {
        13: "its metrics differ from the other replies': unexpected ['acc-group-0']"}
    assert evaluated["acc"] == pytest.approx(0.6)
    assert any("aggregate_evaluate: round 2: dropping the reply of node 13: its metrics differ from the other "
               "replies': unexpected ['extra']" in r.getMessage() for r in flwr_records.records)


@pytest.mark.parametrize("count", [float("inf"), float("nan"), -1.0])
def test_a_reply_with_a_non_finite_or_negative_group_count_is_dropped(count, make_reply):
    # FairLoRA weights each group's singular values by these counts: inf turned S into NaN.
    strategy = _strategy("fairlora")
    replies = [make_reply(n, {"w": np.array([1.0, 1.0], dtype=np.float32), "b": np.array([1.0], dtype=np.float32)},
                          10, {"num-examples-group-0": 10.0 if n != 13 else count}, server_round=2)
               for n in (11, 12, 13)]
    strategy.aggregate_train(2, replies)
    assert dict(strategy.dropped_replies) == {
        13: f"its group count 'num-examples-group-0' is {count!r}, expected a finite number >= 0"}


def test_a_reply_whose_group_counts_exceed_its_examples_is_dropped_in_training_and_evaluation(make_reply,
                                                                                              flwr_records):
    # One site's group-0 count of 1e9 for 10 examples took over group 0's singular values.
    strategy = _strategy("fairlora")
    counts = {11: (5.0, 5.0), 12: (4.0, 6.0), 13: (1e9, 0.0)}
    replies = [make_reply(n, {"w": np.array([1.0, 1.0], dtype=np.float32), "b": np.array([1.0], dtype=np.float32)},
                          10, {"num-examples-group-0": c0, "num-examples-group-1": c1}, server_round=2)
               for n, (c0, c1) in counts.items()]
    strategy.aggregate_train(2, replies)
    assert dict(strategy.dropped_replies) == {
        13: "its group counts add up to 1e+09, more than its 'num-examples' of 10"}
    evaluated = strategy.aggregate_evaluate(2, [
        make_reply(n, None, 10, {"acc": 0.5, "num-examples-group-0": c0, "num-examples-group-1": c1})
        for n, (c0, c1) in counts.items()])
    assert evaluated["acc"] == pytest.approx(0.5)
    assert any("aggregate_evaluate: round 2: dropping the reply of node 13: its group counts add up to 1e+09"
               in r.getMessage() for r in flwr_records.records)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedld", "fedmedian"])
def test_integer_arrays_keep_their_dtype_in_the_global_model(name, make_reply):
    # Flower's mean made BatchNorm's int64 counter float64; the next round's replies (int64)
    # would then not fit the global model.
    strategy = create_strategy(name, {}, num_sites=2)
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32)), "n": Array(np.array(4, np.int64))})
    list(strategy.configure_train(2, arrays, ConfigRecord(), _FourNodes()))
    replies = [make_reply(11, {"w": np.ones(2, np.float32), "n": np.array(5, np.int64)}, 10, server_round=2),
               make_reply(12, {"w": np.ones(2, np.float32), "n": np.array(8, np.int64)}, 30, server_round=2)]
    new, _ = strategy.aggregate_train(2, replies)
    assert new["n"].dtype == "int64" and new["n"].shape == () and new["w"].dtype == "float32"
    # The next round's replies fit the new global model.
    list(strategy.configure_train(3, new, ConfigRecord(), _FourNodes()))
    strategy.aggregate_train(3, [make_reply(11, {"w": np.ones(2, np.float32), "n": np.array(9, np.int64)}, 10,
                                            server_round=3)])
    assert dict(strategy.dropped_replies) == {}


def test_an_update_far_larger_than_the_others_is_dropped_and_recorded_when_asked(make_reply, flwr_records):
    # Prepare: update norms about 1.4, 1.4, 1.4 and 1400.
    strategy = _strategy("fedavg", reply_policy=ReplyPolicy(max_update_norm_z=6.0))
    replies = [_good(make_reply, 11, [1.0, 1.0]), _good(make_reply, 12, [1.1, 0.9]), _good(make_reply, 13, [0.9, 1.1]),
               _good(make_reply, 14, [1000.0, 1000.0])]
    # Execute
    arrays, _ = strategy.aggregate_train(2, replies)
    # Assert
    assert list(strategy.dropped_replies) == [14]
    assert "robust standard deviations above the median" in strategy.dropped_replies[14]
    assert any("dropping the reply of node 14" in r.getMessage() for r in flwr_records.records)
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.0], rtol=1e-6)


def test_the_outlier_check_is_off_by_default(make_reply):
    # Off: a site with four times the data moved 6x as far as the others in a measured
    # round (see ReplyPolicy), and an honest large site must not be dropped.
    strategy = _strategy("fedavg")
    replies = [_good(make_reply, 11, [1.0, 1.0]), _good(make_reply, 12, [1.1, 0.9]), _good(make_reply, 13, [0.9, 1.1]),
               _good(make_reply, 14, [1000.0, 1000.0])]
    strategy.aggregate_train(2, replies)
    assert dict(strategy.dropped_replies) == {}


def test_clipping_scales_each_update_to_the_limit_before_averaging(make_reply):
    # Prepare: updates of w ([3, 4], norm 5 with b's 0) and ([0, 1]) with b unchanged; clip at 1.
    strategy = _strategy("fedavg", reply_policy=ReplyPolicy(max_update_norm_z=None, clip_update_norm=1.0))
    replies = [
        make_reply(11, {"w": np.array([3.0, 4.0], dtype=np.float32), "b": np.zeros(1, np.float32)}, 1, server_round=2),
        make_reply(12, {"w": np.array([0.0, 1.0], dtype=np.float32), "b": np.zeros(1, np.float32)}, 1, server_round=2),
    ]
    # Execute
    arrays, _ = strategy.aggregate_train(2, replies)
    # Assert: [3, 4] -> [0.6, 0.8]; mean with [0, 1] = [0.3, 0.9].
    np.testing.assert_allclose(arrays["w"].numpy(), [0.3, 0.9], rtol=1e-6)


def test_arrays_a_site_does_not_send_keep_their_global_value(make_reply):
    # FedBN's and FairLoRA's sites send part of the model; the global arrays stay complete.
    strategy = _strategy("fedbn")
    replies = [make_reply(11, {"w": np.array([2.0, 2.0], dtype=np.float32)}, 1, server_round=2)]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert list(arrays) == ["w", "b"]
    np.testing.assert_array_equal(arrays["b"].numpy(), GLOBAL["b"])


def test_norm_helpers_match_hand_computations():
    reference = {"w": np.array([1.0, 1.0]), "n": np.array([3])}
    arrays = {"w": np.array([4.0, 5.0]), "n": np.array([100])}  # integer arrays do not count
    assert update_norm(arrays, reference) == pytest.approx(5.0)
    np.testing.assert_allclose(clip_update(arrays, reference, 2.5)["w"], [2.5, 3.0])
    # Two sites: no majority says which is off (any two norms are 0.674 robust SDs apart).
    assert find_norm_outliers([1.0, 50.0], max_z=0.5) == {}
    assert list(find_norm_outliers([1.0, 1.1, 0.9, 50.0], max_z=6)) == [3]
    assert find_norm_outliers([1.0, 1.05, 0.95, 1.2], max_z=6) == {}  # near-equal norms are fine
    # The spread is at least 10 % of the median: a tiny MAD flags no honest site, and a
    # MAD of 0 (most sites identical) still flags the one far off.
    assert find_norm_outliers([1.0, 1.0, 1.01, 1.02, 1.3], max_z=6) == {}
    assert list(find_norm_outliers([1.0, 1.0, 1.0, 1000.0], max_z=6)) == [3]


def test_clipping_measures_and_scales_the_parameters_not_the_batchnorm_statistics():
    # The weights moved 0.5 per entry (norm 1), the running variance 10 (another scanner's
    # intensities): counted in, the norm would be 20 and the weight update shrunk to 0.075.
    reference = {"w": np.zeros(4, np.float32), "bn.running_var": np.ones(4, np.float32)}
    arrays = {"w": np.full(4, 0.5, np.float32), "bn.running_var": np.full(4, 11.0, np.float32)}
    assert update_norm(arrays, reference) == pytest.approx(1.0)
    clipped = clip_update(arrays, reference, max_norm=1.5)
    np.testing.assert_array_equal(clipped["w"], arrays["w"])
    np.testing.assert_array_equal(clipped["bn.running_var"], arrays["bn.running_var"])
    # Clipped below the weights' norm, the weights shrink and the statistics pass through unclipped.
    clipped = clip_update(arrays, reference, max_norm=0.5)
    np.testing.assert_allclose(clipped["w"], np.full(4, 0.25))
    np.testing.assert_array_equal(clipped["bn.running_var"], arrays["bn.running_var"])


def test_a_site_whose_running_variance_differs_is_no_norm_outlier(make_reply):
    # Four sites with the same weight update; the fourth's images have other intensity
    # statistics (another scanner): its running variance is 11, the others' 1.1.
    reference = {"w": np.zeros(2, np.float32), "bn.running_mean": np.zeros(2, np.float32),
                 "bn.running_var": np.ones(2, np.float32), "bn.num_batches_tracked": np.array(0, np.int64)}
    sites = [{"w": np.full(2, 0.3, np.float32), "bn.running_mean": np.full(2, 0.1 if i < 3 else 5.0, np.float32),
              "bn.running_var": np.full(2, 1.1 if i < 3 else 11.0, np.float32),
              "bn.num_batches_tracked": np.array(10 * (i + 1), np.int64)} for i in range(4)]
    assert find_norm_outliers([update_norm(site, reference) for site in sites], max_z=6) == {}
    # The same through a strategy: nobody is dropped, and the fourth site's statistics count.
    strategy = create_strategy("fedavg", {}, num_sites=4, reply_policy=ReplyPolicy(max_update_norm_z=6.0))
    list(strategy.configure_train(2, ArrayRecord({k: Array(v) for k, v in reference.items()}), ConfigRecord(),
                                  _FourNodes()))
    arrays, _ = strategy.aggregate_train(2, [make_reply(11 + i, site, 10, server_round=2)
                                             for i, site in enumerate(sites)])
    assert dict(strategy.dropped_replies) == {}
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), np.full(2, 3.575), rtol=1e-6)
