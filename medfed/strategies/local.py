"""Local-only training as a strategy: the baseline every federation must beat.

Each site trains its own model and keeps all of it between rounds (its local state);
nothing is sent back and the global arrays never change. Evaluation reports each site's
own model on its own test split, so the aggregated metrics are the mean of the sites'
local models, as in the papers' "Local" rows. In round 1 every site starts from the same
initial model.
"""

from __future__ import annotations

import torch
from flwr.serverapp import strategy as flwr_strategy
from torch import nn

from .base import MedfedStrategy
from .hooks import ClientHooks
from .registry import register_strategy

__all__ = ["LocalOnly", "LocalOnlyHooks"]


class LocalOnlyHooks(ClientHooks):
    """Keep the whole model at the site; send nothing."""

    def sent_arrays(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {}

    def local_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@register_strategy("local")
class LocalOnly(MedfedStrategy, flwr_strategy.FedAvg):
    """No aggregation: every site keeps its own model (constructor as Flower's FedAvg)."""

    client_hooks = LocalOnlyHooks
