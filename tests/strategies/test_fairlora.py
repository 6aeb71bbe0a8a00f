"""FairLoRA's server step against hand computations, and its client hooks."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from medfed.strategies import FairLoRA, StrategyError, create_strategy
from medfed.strategies._groups import group_count_metrics, read_group_counts
from medfed.strategies.fairlora import FairLoRAHooks, fairlora_aggregate


def _sites():
    # Two sites; S is [G=2, r=2]; A is a 1-element stand-in for every non-S array.
    return [
        {"a.A": np.array([1.0]), "a.S": np.array([[1.0, 2.0], [3.0, 4.0]])},
        {"a.A": np.array([4.0]), "a.S": np.array([[5.0, 6.0], [7.0, 8.0]])},
    ]


PREVIOUS = {"a.A": np.array([0.0]), "a.S": np.array([[9.0, 9.0], [9.0, 9.0]])}


def test_A_by_sample_counts_and_each_S_row_by_its_group_counts():
    # Prepare: samples 10 and 30; group counts site 1 = [3, 0], site 2 = [1, 5].
    counts = np.array([[3, 0], [1, 5]])
    # Execute
    new = fairlora_aggregate(_sites(), [10, 30], counts, PREVIOUS, singular_value_keys=["a.S"])
    # Assert: A = (10 * 1 + 30 * 4) / 40 = 3.25; S_0 = (3 * [1, 2] + 1 * [5, 6]) / 4 = [2, 3];
    # S_1 = only site 2 holds group 1 = [7, 8].
    np.testing.assert_allclose(new["a.A"], [3.25])
    np.testing.assert_allclose(new["a.S"], [[2.0, 3.0], [7.0, 8.0]])


def test_group_no_site_holds_keeps_its_own_half_and_the_shared_half_is_the_trained_groups_mean():
    counts = np.array([[3, 0], [1, 0]])
    new = fairlora_aggregate(_sites(), [1, 1], counts, PREVIOUS, singular_value_keys=["a.S"], shared_half_s=True)
    # S_0 = [2, 3]; S_1 keeps its own column at 9; the shared column (r // 2 = 1) is the
    # mean over the groups some site trained, here group 0 alone: 2 (not (2 + 9) / 2,
    # which would pull it back to group 1's stale value every round).
    np.testing.assert_allclose(new["a.S"], [[2.0, 3.0], [2.0, 9.0]])


def test_shared_half_is_averaged_over_every_group_when_all_are_held():
    counts = np.array([[3, 0], [1, 5]])
    new = fairlora_aggregate(_sites(), [1, 1], counts, PREVIOUS, singular_value_keys=["a.S"], shared_half_s=True)
    # S_0 = [2, 3], S_1 = [7, 8]; shared column (2 + 7) / 2 = 4.5.
    np.testing.assert_allclose(new["a.S"], [[4.5, 3.0], [4.5, 8.0]])


def test_ema_mixes_in_the_previous_global_arrays():
    new = fairlora_aggregate(_sites(), [1, 1], np.ones((2, 2)), PREVIOUS, singular_value_keys=[], beta=0.25)
    # A: 0.75 * 2.5 + 0.25 * 0 = 1.875.
    np.testing.assert_allclose(new["a.A"], [1.875])


@pytest.mark.parametrize(("server_round", "beta"), [(1, 0.0), (2, 0.999 * 1 / 4), (4, 0.999 * 3 / 4)])
def test_strategy_applies_the_authors_beta_schedule_and_group_counts(make_reply, server_round, beta):
    # Prepare: round t of 4 -> beta = 0.999 * (t - 1) / 4: the authors count rounds from 0
    # (utils/fed_utils.py, average_weights_EMA), so round 1 is the plain average.
    strategy = FairLoRA(num_groups=2, num_rounds=4)
    strategy.global_arrays = ArrayRecord({k: Array(v) for k, v in PREVIOUS.items()})
    sites = _sites()
    replies = [
        make_reply(11, sites[0], 10, group_count_metrics(np.array([0, 0, 0]), 2), server_round=server_round),
        make_reply(12, sites[1], 30, group_count_metrics(np.array([0, 1, 1, 1, 1, 1]), 2), server_round=server_round),
    ]
    # Execute
    arrays, _ = strategy.aggregate_train(server_round, replies)
    # Assert
    np.testing.assert_allclose(arrays["a.A"].numpy(), [(1 - beta) * 3.25])
    np.testing.assert_allclose(arrays["a.S"].numpy(), (1 - beta) * np.array([[2.0, 3.0], [7.0, 8.0]]) + beta * 9)


def test_a_round_in_which_no_site_reports_a_group_warns_that_S_cannot_learn(make_reply, flwr_records):
    # Without groups every sample has group -1: S gets gradients, but no group count
    # weights its rows, so the server keeps them; say so instead of a silent no-op.
    strategy = FairLoRA(num_groups=2, num_rounds=4)
    strategy.global_arrays = ArrayRecord({k: Array(v) for k, v in PREVIOUS.items()})
    replies = [make_reply(11 + i, site, 10, group_count_metrics(np.array([-1, -1]), 2), server_round=2)
               for i, site in enumerate(_sites())]
    arrays, _ = strategy.aggregate_train(2, replies)
    np.testing.assert_array_equal(arrays["a.S"].numpy(), PREVIOUS["a.S"])
    assert any("no site reports a sample of any patient group" in r.getMessage() for r in flwr_records.records)


def test_evaluation_adds_group_weighted_metrics_and_equity_scaled_ones(make_reply):
    # Prepare: site 1 holds 3 of group 0 (acc 1.0); site 2 holds 1 of group 0 (acc 0.0)
    # and 4 of group 1 (acc 0.5); overall acc is the sample-weighted mean. A group a site
    # does not hold has a NaN metric (Flower needs the same keys in every reply).
    strategy = FairLoRA(num_groups=2)
    replies = [
        make_reply(11, None, 3, {"acc": 1.0, "acc-group-0": 1.0, "acc-group-1": float("nan"),
                                 **group_count_metrics([0, 0, 0], 2)}),
        make_reply(12, None, 5, {"acc": 0.4, "acc-group-0": 0.0, "acc-group-1": 0.5,
                                 **group_count_metrics([0, 1, 1, 1, 1], 2)}),
    ]
    # Execute
    metrics = strategy.aggregate_evaluate(1, replies)
    # Assert: acc = (3 + 2) / 8 = 0.625; group 0 = 3/4 = 0.75, group 1 = 0.5;
    # ES-ACC = 0.625 / (1 + 0.125 + 0.125) = 0.5.
    assert metrics["acc"] == pytest.approx(0.625)
    assert metrics["acc-group-0"] == pytest.approx(0.75) and metrics["acc-group-1"] == pytest.approx(0.5)
    assert metrics["es-acc"] == pytest.approx(0.5)


def test_group_counts_round_trip_and_unknown_groups_are_not_counted():
    metrics = group_count_metrics(np.array([0, 2, 2, -1]), 3)
    assert metrics == {"num-examples-group-0": 1, "num-examples-group-1": 0, "num-examples-group-2": 2}
    np.testing.assert_array_equal(read_group_counts(metrics, 3), [1, 0, 2])
    assert group_count_metrics(None, 2) == {"num-examples-group-0": 0, "num-examples-group-1": 0}


def test_hooks_need_a_pretrained_backbone_and_read_the_strategy_settings():
    strategy = FairLoRA(num_groups=3, rank=2, targets=["*.kan.*"])
    hooks = FairLoRAHooks(strategy.client_params())
    assert (hooks.num_groups, hooks.rank, hooks.targets) == (3, 2, ("*.kan.*",))
    from medfed.strategies import ModelSpec
    from medfed.models.pretrained import PretrainedError

    with pytest.raises(PretrainedError, match="set model.init_from"):
        hooks.build_model(ModelSpec("medvit_v2_nano", 2, 1, 28))


def test_targets_that_match_no_layer_are_a_one_line_error_naming_the_key_and_the_layer_names(tmp_path):
    # Was a bare ValueError from GroupLoRAModel: a traceback out of the ServerApp.
    import torch
    from safetensors.torch import save_file

    from medfed.errors import MedfedError
    from medfed.models import create_model
    from medfed.strategies import ModelSpec

    backbone = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(tmp_path / "model.safetensors"))
    hooks = FairLoRAHooks(FairLoRA(targets=["nomatch*", "head"]).client_params())
    with pytest.raises(MedfedError) as info:  # the CLI prints it as one line, exit 2
        hooks.build_model(ModelSpec("medvit_v2_nano", 2, 1, 28, str(tmp_path)))
    assert str(info.value) == (
        "strategy.params.targets ['nomatch*', 'head'] matches no linear layer of the backbone: the fnmatch patterns "
        "are matched against full module names, such as 'stages.0.0.attn.qkv', 'stages.0.0.attn.proj', "
        "'stages.1.1.mhsa.q', 'stages.1.1.mhsa.kv', 'stages.1.1.mhsa.proj', 'stages.1.1.kan.layers.0.linear' "
        "(25 linear layers besides the head); e.g. ['*.attn.*'], or null for all of them."
    )
    torch.manual_seed(0)
    assert len(FairLoRAHooks(FairLoRA(targets=["stages.1.1.mhsa.q"]).client_params()).build_model(
        ModelSpec("medvit_v2_nano", 2, 1, 28, str(tmp_path))).adapters) == 1


@pytest.mark.parametrize(("params", "message"), [
    ({"rank": 0}, "The 'rank' parameter of strategy 'fairlora' (strategy.params.rank) must be an int >= 1. "
                  "Got 0 instead."),
    ({"ema_beta_max": 1.0}, "(strategy.params.ema_beta_max) must be a float in [0, 1). Got 1.0 instead."),
    ({"targets": "*"}, "(strategy.params.targets) must be a list of str or null. Got '*' instead."),
    # 1e400 in YAML is inf: accepted, it made every adapter output inf or NaN.
    ({"alpha": 1e400}, "The 'alpha' parameter of strategy 'fairlora' (strategy.params.alpha) must be a finite "
                       "float > 0. Got inf instead."),
    ({"alpha": float("nan")}, "(strategy.params.alpha) must be a finite float > 0. Got nan instead."),
    ({"own_group_weight": float("nan")}, "(strategy.params.own_group_weight) must be a float in (0, 1]. "
                                         "Got nan instead."),
    ({"ema_beta_max": float("-inf")}, "(strategy.params.ema_beta_max) must be a float in [0, 1). Got -inf instead."),
    ({"num_rounds": 0}, "The 'num_rounds' parameter of strategy 'fairlora' (rounds) must be an int >= 1."),
    ({"rank": 2.0}, "(strategy.params.rank) must be an int >= 1. Got 2.0 instead."),
    ({"shared_half_s": "yes"}, "(strategy.params.shared_half_s) must be a bool. Got 'yes' instead."),
])
def test_bad_parameters_are_one_line_errors(params, message):
    with pytest.raises(StrategyError) as info:
        FairLoRA(**params)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_shared_half_s_with_rank_1_is_refused_as_it_would_share_nothing():
    # rank // 2 = 0 singular values are shared: shared_half_s was silently a no-op.
    with pytest.raises(StrategyError) as info:
        create_strategy("fairlora", {"rank": 1, "shared_half_s": True}, num_sites=2)
    assert str(info.value) == (
        "strategy.params.shared_half_s needs strategy.params.rank >= 2: it averages the first rank // 2 singular "
        "values over the groups, and rank 1 has none to share; raise rank or set shared_half_s to false."
    )
    assert FairLoRA(rank=1).rank == 1 and FairLoRA(rank=2, shared_half_s=True).shared_half_s
