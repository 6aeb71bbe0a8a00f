"""FedLD: the principal-gradient aggregation and the margin loss against hand computations."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from medfed.strategies import FedLD, StrategyError, create_strategy, principal_gradient_aggregate
from medfed.strategies.fedld import FedLDHooks, margin_loss


def test_two_orthogonal_updates_keep_the_stronger_direction():
    # Delta = [[2, 0], [0, 1]]: G = diag(4, 1) / 2, s = [2, 0.5]; k = floor(2 * 0.8) = 1,
    # v_0 = +-[2, 0]. Rebuilt: site 1 -> 2 * (2 / 2.5) * [1, 0] = [1.6, 0]; site 2 has
    # <Delta_2, v_0> = 0 -> [0, 0]. Mean: [0.8, 0].
    result = principal_gradient_aggregate([np.array([2.0, 0.0]), np.array([0.0, 1.0])])
    np.testing.assert_allclose(result, [0.8, 0.0], atol=1e-12)


def test_three_sites_keep_two_directions_weighted_by_singular_values():
    # Delta = diag(1, 2, 3): G = diag(1, 4, 9) / 3, s = [3, 4/3, 1/3] (sum 14/3);
    # k = floor(3 * 0.8) = 2: directions e3 (weight 9/14) and e2 (weight 4/14).
    # Rebuilt: site 1 -> 0; site 2 -> 2 * 4/14 * e2; site 3 -> 3 * 9/14 * e3.
    updates = [np.diag([1.0, 2.0, 3.0])[i] for i in range(3)]
    result = principal_gradient_aggregate(updates)
    np.testing.assert_allclose(result, [0.0, 8 / 42, 27 / 42], atol=1e-12)


def test_agreeing_sites_share_one_direction_with_their_norms():
    # Delta = [[3, 1], [1, 3]]: G = [[5, 3], [3, 5]], eigenvalues 8 ([1, 1]/sqrt2) and 2;
    # k = 1, weight 8 / 10; both updates have norm sqrt(10) and a positive projection:
    # rebuilt = sqrt(10) * 0.8 * [1, 1] / sqrt(2) each, so the mean is 0.8 * sqrt(5) * [1, 1].
    result = principal_gradient_aggregate([np.array([3.0, 1.0]), np.array([1.0, 3.0])])
    np.testing.assert_allclose(result, [0.8 * math.sqrt(5)] * 2, rtol=1e-12)


def test_matches_a_direct_implementation_of_the_formula_on_random_updates():
    # Prepare: the rebuild written out literally, one site and one direction at a time.
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=(4, 5)) for _ in range(5)]
    delta = np.stack([u.ravel() for u in updates])
    u, s, _ = np.linalg.svd(delta @ delta.T / 5)
    k = 4  # floor(5 * 0.8)
    directions = (delta.T @ u).T[:k]
    expected = np.zeros(20)
    for i in range(5):
        rebuilt = sum(
            s[j] / s.sum() * np.sign(delta[i] @ directions[j]) * directions[j] / np.linalg.norm(directions[j])
            for j in range(k)
        )
        expected += np.linalg.norm(delta[i]) * rebuilt / 5
    # Execute
    result = principal_gradient_aggregate(updates)
    # Assert
    assert result.shape == (4, 5)
    np.testing.assert_allclose(result.ravel(), expected, rtol=1e-10)


def test_huge_but_finite_float32_updates_do_not_overflow_the_gram_matrix():
    # Norms near 6e38 overflow a float32 Gram matrix (inf, then NaN after the SVD).
    updates = [np.full(4, 3e38, dtype=np.float32), np.full(4, 3e38, dtype=np.float32),
               np.full(4, 0.1, dtype=np.float32)]
    result = principal_gradient_aggregate(updates)
    reference = principal_gradient_aggregate([u.astype(np.float64) for u in updates])
    assert result.dtype == np.float32 and np.isfinite(result).all()
    np.testing.assert_allclose(result, reference.astype(np.float32), rtol=1e-5)


def test_first_round_is_the_plain_mean_and_dtype_and_shape_are_kept():
    updates = [np.ones((2, 2), dtype=np.float32), 3 * np.ones((2, 2), dtype=np.float32)]
    result = principal_gradient_aggregate(updates, first_round=True)
    assert result.dtype == np.float32 and result.shape == (2, 2)
    np.testing.assert_array_equal(result, 2 * np.ones((2, 2)))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least one"):
        principal_gradient_aggregate([])
    with pytest.raises(ValueError, match="same shape|must have shape"):
        principal_gradient_aggregate([np.zeros(2), np.zeros(3)])
    with pytest.raises(ValueError, match="k_proportion"):
        principal_gradient_aggregate([np.zeros(2)], k_proportion=0)


def test_strategy_steps_float_arrays_by_principal_gradient_and_averages_counters(make_reply):
    # Prepare: global w = [1, 1], counter 4; round 2, two sites.
    strategy = FedLD()
    strategy.global_arrays = ArrayRecord({"w": Array(np.array([1.0, 1.0])), "n": Array(np.array([4]))})
    replies = [
        make_reply(11, {"w": np.array([3.0, 1.0]), "n": np.array([6])}, 10, server_round=2),
        make_reply(12, {"w": np.array([1.0, 2.0]), "n": np.array([9])}, 30, server_round=2),
    ]
    # Execute
    arrays, _ = strategy.aggregate_train(2, replies)
    # Assert: updates [2, 0] and [0, 1] -> step [0.8, 0] (first test); counters (6 + 9) / 2 = 7.5 -> 8.
    np.testing.assert_allclose(arrays["w"].numpy(), [1.8, 1.0])
    np.testing.assert_array_equal(arrays["n"].numpy(), [8])


def test_running_statistics_take_the_plain_mean_and_stay_positive(make_reply):
    # Three sites' positive running variances (found by a random search) that the
    # principal-gradient step would push below zero (-0.022 in channel 4): NaN in BatchNorm.
    previous = np.array([1.7, 1.6, 0.81, 0.78, 0.25, 1.11])
    sites = [np.array([0.43, 1.06, 0.61, 0.46, 5.5, 1.37]), np.array([1.02, 2.51, 0.61, 0.88, 0.5, 0.43]),
             np.array([1.45, 0.93, 0.5, 0.38, 0.06, 11.76])]
    stepped = previous + principal_gradient_aggregate([v - previous for v in sites], 0.8)
    assert stepped[4] < 0
    strategy = FedLD()
    strategy.global_arrays = ArrayRecord({"bn.running_var": Array(previous), "bn.running_mean": Array(previous)})
    replies = [make_reply(11 + i, {"bn.running_var": v, "bn.running_mean": v}, 10, server_round=2)
               for i, v in enumerate(sites)]
    arrays, _ = strategy.aggregate_train(2, replies)
    expected = np.mean(np.stack(sites), axis=0)
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), expected)
    np.testing.assert_allclose(arrays["bn.running_mean"].numpy(), expected)


def test_margin_loss_is_lambda_log_one_plus_squared_frobenius_norm_of_softmax():
    # Prepare: softmax([0, 0]) = [0.5, 0.5]; softmax([ln 3, 0]) = [0.75, 0.25].
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # Execute
    value = margin_loss(logits, 0.03)
    # Assert: ||P||^2 = 0.25 + 0.25 + 0.5625 + 0.0625 = 1.125.
    assert value.item() == pytest.approx(0.03 * math.log(2.125), rel=1e-6)


def test_hooks_add_the_margin_term_with_the_lambda_the_strategy_sends():
    # Prepare
    strategy = FedLD(margin_lambda=0.1)
    hooks = FedLDHooks(strategy.client_params())
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    # Execute
    term = hooks.extra_loss(torch.nn.Linear(1, 1))
    # Assert
    assert term(logits, torch.tensor([1])).item() == pytest.approx(margin_loss(logits, 0.1).item())
    assert FedLDHooks({"fedld-margin-lambda": 0.0}).extra_loss(torch.nn.Linear(1, 1)) is None


@pytest.mark.parametrize(("params", "message"), [
    # 1e400 in YAML is inf: accepted, it made every site's loss inf.
    ({"margin_lambda": 1e400}, "The 'margin_lambda' parameter of strategy 'fedld' (strategy.params.margin_lambda) "
                               "must be a finite float >= 0. Got inf instead."),
    ({"margin_lambda": float("nan")}, "(strategy.params.margin_lambda) must be a finite float >= 0. Got nan instead."),
    ({"margin_lambda": -0.1}, "(strategy.params.margin_lambda) must be a finite float >= 0. Got -0.1 instead."),
    ({"k_proportion": 0}, "(strategy.params.k_proportion) must be a float in (0, 1]. Got 0.0 instead."),
    ({"k_proportion": float("inf")}, "(strategy.params.k_proportion) must be a float in (0, 1]. Got inf instead."),
    ({"k_proportion": float("nan")}, "(strategy.params.k_proportion) must be a float in (0, 1]. Got nan instead."),
])
def test_bad_parameters_are_one_line_errors_naming_the_config_key(params, message):
    with pytest.raises(StrategyError) as info:
        create_strategy("fedld", params, num_sites=2)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
