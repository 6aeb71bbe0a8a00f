"""FedBN (Li et al., ICLR 2021, https://arxiv.org/abs/2102.07623): BatchNorm stays at the site.

Every state-dict entry of a BatchNorm layer (weight, bias, running mean and variance,
batch counter) is kept by the site between rounds and never sent; all other arrays
are averaged as in FedAvg. Sites with different scanners or stainings keep their own
feature statistics, which is what FedBN is for.

BatchNorm layers are found by module type (``torch.nn.modules.batchnorm._BatchNorm``:
BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants), never by name.

The server's global arrays still hold BatchNorm entries (those of the initial model):
a site in its first round starts from them, later rounds from its own. A site evaluates
with its own BatchNorm (personalised evaluation, as in the paper). A site that has never
trained (a held-out hospital, a site evaluated before its first round) has none: it
estimates the BatchNorm statistics from its own training images before evaluating
(AdaBN, Li et al. 2016, https://arxiv.org/abs/1603.04779; labels unused, nothing kept or
sent). Its affine BatchNorm weights stay the initial model's, which no site trained:
the global ``model.safetensors`` of a FedBN run is no complete model for a new site.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import torch
from flwr.serverapp import strategy as flwr_strategy
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .base import MedfedStrategy
from .hooks import ClientHooks
from .registry import register_strategy

__all__ = ["FedBN", "FedBNHooks", "batchnorm_keys", "estimate_batchnorm_statistics"]


def batchnorm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm layer in ``model`` (weights, biases, statistics, counters)."""
    keys = []
    for module_name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            prefix = f"{module_name}." if module_name else ""
            keys.extend(prefix + name for name in module.state_dict())
    return keys


@torch.no_grad()
def estimate_batchnorm_statistics(model: nn.Module, images: Iterable[torch.Tensor], device: torch.device) -> int:
    """Replace every BatchNorm layer's running mean and variance by their average over ``images``.

    Parameters
    ----------
    model : nn.Module
        On ``device``; left in eval mode.
    images : iterable of Tensor
        ``[B, C, H, W]`` batches (one pass).
    device : torch.device
        Where the batches go.

    Returns
    -------
    int
        Images seen; 0 leaves the statistics as they were.

    Unlike ``torch.optim.swa_utils.update_bn``, only the BatchNorm layers run in
    training mode: in a whole model in training mode stochastic depth would drop blocks
    and the statistics would describe features that evaluation never sees.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    batches = iter(images)
    first = next(batches, None)
    if not layers or first is None:
        return 0
    momenta = {layer: layer.momentum for layer in layers}
    model.eval()
    seen = 0
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over every batch, not an exponential one
        layer.train()
    try:
        for batch in itertools.chain([first], batches):
            model(batch.to(device))
            seen += len(batch)
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        model.eval()
    return seen


class FedBNHooks(ClientHooks):
    """Send everything but BatchNorm; keep BatchNorm as the site's local state."""

    def sent_arrays(self, model: nn.Module) -> dict[str, torch.Tensor]:
        local = set(batchnorm_keys(model))
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in local}

    def local_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {k: state[k].detach().cpu().clone() for k in batchnorm_keys(model)}

    def before_evaluation(
        self, model: nn.Module, local_state: Mapping[str, torch.Tensor], images: Iterable[torch.Tensor],
        device: torch.device,
    ) -> str | None:
        """At a site without BatchNorm of its own, estimate its statistics from ``images``."""
        if local_state:
            return None
        seen = estimate_batchnorm_statistics(model, images, device)
        if not seen:
            return "FedBN: the site has no BatchNorm of its own and no training images to estimate it from"
        return f"FedBN: BatchNorm statistics estimated from {seen} training images (the site has none of its own)"


@register_strategy("fedbn")
class FedBN(MedfedStrategy, flwr_strategy.FedAvg):
    """FedAvg over the non-BatchNorm arrays; each site keeps its own BatchNorm.

    Takes the constructor arguments of ``flwr.serverapp.strategy.FedAvg``.
    """

    client_hooks = FedBNHooks
