"""FedBN (Li et al., ICLR 2021, https://arxiv.org/abs/2102.07623): BatchNorm stays at the site.

Every state-dict entry of a BatchNorm layer (weight, bias, running mean and variance,
batch counter) is kept by the site between rounds and never sent; all other arrays
are averaged as in FedAvg. Sites with different scanners or stainings keep their own
feature statistics, which is what FedBN is for.

BatchNorm layers are found by module type (``torch.nn.modules.batchnorm._BatchNorm``:
BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants), never by name.

The server's global arrays still hold BatchNorm entries (those of the initial model):
a site in its first round starts from them, later rounds from its own. The global
``model.safetensors`` of a FedBN run is therefore no complete model for a new site: a
site evaluates with its own BatchNorm (personalised evaluation, as in the paper).
"""

from __future__ import annotations

import torch
from flwr.serverapp import strategy as flwr_strategy
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .base import MedfedStrategy
from .hooks import ClientHooks
from .registry import register_strategy

__all__ = ["FedBN", "FedBNHooks", "batchnorm_keys"]


def batchnorm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm layer in ``model`` (weights, biases, statistics, counters)."""
    keys = []
    for module_name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            prefix = f"{module_name}." if module_name else ""
            keys.extend(prefix + name for name in module.state_dict())
    return keys


class FedBNHooks(ClientHooks):
    """Send everything but BatchNorm; keep BatchNorm as the site's local state."""

    def sent_arrays(self, model: nn.Module) -> dict[str, torch.Tensor]:
        local = set(batchnorm_keys(model))
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in local}

    def local_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {k: state[k].detach().cpu().clone() for k in batchnorm_keys(model)}


@register_strategy("fedbn")
class FedBN(MedfedStrategy, flwr_strategy.FedAvg):
    """FedAvg over the non-BatchNorm arrays; each site keeps its own BatchNorm.

    Takes the constructor arguments of ``flwr.serverapp.strategy.FedAvg``.
    """

    client_hooks = FedBNHooks
