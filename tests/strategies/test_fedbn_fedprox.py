"""FedBN's and FedProx's client halves."""

import pytest
import torch
from torch import nn

from medfed.strategies import FedProx, StrategyError, client_hooks_for, create_strategy
from medfed.strategies.fedbn import FedBNHooks, batchnorm_keys
from medfed.strategies.fedprox import ProximalHooks, proximal_term


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.weird_name = nn.BatchNorm2d(2)  # found by type, not by name
        self.bn = nn.Linear(2, 2)  # a name that looks like BatchNorm, but is not
        self.ln = nn.LayerNorm(2)


def test_batchnorm_is_found_by_module_type_with_statistics_and_counter():
    assert batchnorm_keys(_Net()) == [
        "weird_name.weight", "weird_name.bias", "weird_name.running_mean", "weird_name.running_var",
        "weird_name.num_batches_tracked",
    ]


def test_fedbn_hooks_send_everything_else_and_keep_batchnorm():
    net = _Net()
    hooks = FedBNHooks({})
    assert set(hooks.sent_arrays(net)) == set(net.state_dict()) - set(batchnorm_keys(net))
    assert set(hooks.local_state(net)) == set(batchnorm_keys(net))


def test_fedbn_loads_the_global_model_then_its_own_batchnorm():
    # Prepare
    net, other = _Net(), _Net()
    with torch.no_grad():
        other.weird_name.running_mean.fill_(7.0)
    global_arrays = _Net().state_dict()
    # Execute
    FedBNHooks({}).load_global(net, global_arrays, FedBNHooks({}).local_state(other))
    # Assert
    torch.testing.assert_close(net.conv.weight, global_arrays["conv.weight"])
    torch.testing.assert_close(net.weird_name.running_mean, torch.full((2,), 7.0))


def test_fedprox_hooks_take_mu_from_the_strategy_and_penalise_distance():
    # Prepare
    strategy = FedProx(proximal_mu=0.5)
    hooks = client_hooks_for("fedprox")({"proximal-mu": strategy.proximal_mu})
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()  # exact arithmetic below, whatever the RNG state
    term = hooks.extra_loss(model)
    with torch.no_grad():
        model.weight.add_(2.0)
    # Execute / Assert: 0.5 / 2 * 2^2 = 1.
    assert isinstance(hooks, ProximalHooks)
    assert term(torch.zeros(1, 1), torch.zeros(1)).item() == 1.0
    assert ProximalHooks({}).extra_loss(model) is None


def test_local_only_sends_nothing_and_keeps_the_whole_model():
    from medfed.strategies.local import LocalOnlyHooks

    net = _Net()
    assert LocalOnlyHooks({}).sent_arrays(net) == {}
    assert set(LocalOnlyHooks({}).local_state(net)) == set(net.state_dict())


class _DropoutThenBatchNorm(nn.Module):
    """Dropout before BatchNorm: estimated statistics must not see dropped activations."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(p=0.9)
        self.bn = nn.BatchNorm2d(2, momentum=0.3)

    def forward(self, x):
        return self.bn(self.drop(x))


def _batches(images: torch.Tensor, size: int):
    return [images[i:i + size] for i in range(0, len(images), size)]


def test_estimated_batchnorm_statistics_are_those_of_the_site_images_with_the_rest_in_eval_mode():
    # Prepare: channel 0 around 3, channel 1 around -2; two equal batches.
    from medfed.strategies.fedbn import estimate_batchnorm_statistics

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 2, 4, 4, generator=generator) + torch.tensor([3.0, -2.0]).view(1, 2, 1, 1)
    net = _DropoutThenBatchNorm().eval()
    # Execute
    seen = estimate_batchnorm_statistics(net, _batches(images, 4), torch.device("cpu"))
    # Assert: dropout stayed off (p=0.9 would shrink the mean tenfold), the mean is over
    # every image, the variance is the mean of the per-batch (unbiased) variances.
    assert seen == 8
    torch.testing.assert_close(net.bn.running_mean, images.mean(dim=(0, 2, 3)))
    per_batch_var = torch.stack([b.transpose(0, 1).reshape(2, -1).var(dim=1) for b in _batches(images, 4)])
    torch.testing.assert_close(net.bn.running_var, per_batch_var.mean(dim=0))
    assert net.bn.momentum == 0.3 and not net.training and not net.bn.training


def test_no_images_leave_the_statistics_as_they_were():
    from medfed.strategies.fedbn import estimate_batchnorm_statistics

    net = _DropoutThenBatchNorm()
    with torch.no_grad():
        net.bn.running_mean.fill_(5.0)
    assert estimate_batchnorm_statistics(net, [], torch.device("cpu")) == 0
    torch.testing.assert_close(net.bn.running_mean, torch.full((2,), 5.0))


def test_fedbn_estimates_statistics_only_at_a_site_without_its_own_batchnorm():
    # Prepare
    hooks, net = FedBNHooks({}), _DropoutThenBatchNorm().eval()
    images = torch.full((4, 2, 3, 3), 6.0)

    def untouchable():
        raise AssertionError("a site with its own BatchNorm must not read its training images")
        yield  # pragma: no cover

    # Execute / Assert: with kept BatchNorm nothing changes and no image is read.
    assert hooks.before_evaluation(net, hooks.local_state(net), untouchable(), torch.device("cpu")) is None
    torch.testing.assert_close(net.bn.running_mean, torch.zeros(2))
    # Execute / Assert: a site that never trained estimates them.
    said = hooks.before_evaluation(net, {}, [images], torch.device("cpu"))
    assert said == "FedBN: BatchNorm statistics estimated from 4 training images (the site has none of its own)"
    assert "no training images" in hooks.before_evaluation(_DropoutThenBatchNorm(), {}, [], torch.device("cpu"))
    torch.testing.assert_close(net.bn.running_mean, torch.full((2,), 6.0))


@pytest.mark.parametrize("mu", [-1, -0.01, float("nan"), float("inf")])
def test_fedprox_refuses_a_negative_or_non_finite_mu(mu):
    # Flower takes mu = -1 and the sites then train plain FedAvg without a word.
    with pytest.raises(StrategyError) as info:
        create_strategy("fedprox", {"proximal_mu": mu}, num_sites=3)

    assert str(info.value) == (
        "The 'proximal_mu' parameter of strategy 'fedprox' (strategy.params.proximal_mu) must be a "
        f"finite float >= 0 (0 is plain FedAvg). Got {float(mu)!r} instead."
    )
    with pytest.raises(ValueError, match="must be a finite float >= 0"):
        proximal_term(nn.Linear(1, 1), mu)


def test_fedprox_mu_zero_is_fedavg_and_keeps_flowers_parameters():
    # Execute
    strategy = create_strategy("fedprox", {"proximal_mu": 0}, num_sites=3)
    # Assert: still Flower's signature, so a misspelt parameter gets a hint.
    assert strategy.proximal_mu == 0.0
    assert proximal_term(nn.Linear(1, 1), 0.0) is None
    with pytest.raises(StrategyError, match="has no parameter 'proximal_mux'; did you mean 'proximal_mu'"):
        create_strategy("fedprox", {"proximal_mux": 0.1}, num_sites=3)
