"""FedBN's and FedProx's client halves."""

import torch
from torch import nn

from medfed.strategies import FedProx, client_hooks_for
from medfed.strategies.fedbn import FedBNHooks, batchnorm_keys
from medfed.strategies.fedprox import ProximalHooks


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
