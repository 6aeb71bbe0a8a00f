"""FedProx (Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127): FedAvg plus a
proximal term at the sites.

Server half: Flower's ``FedProx`` (FedAvg that sends ``"proximal-mu"`` with every
training instruction) with medfed's reply checks. Client half: the site adds
``mu / 2 * ||w - w_global||^2`` over its trainable parameters to the loss, which keeps
heterogeneous sites from drifting far from the global model. ``proximal_mu`` is set in
``strategy.params`` (the authors of FedLD use 0.01 as baseline).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.serverapp import strategy as flwr_strategy
from torch import nn

from .base import MedfedStrategy
from .hooks import ClientHooks, ExtraLoss
from .registry import check_number, register_strategy

__all__ = ["FedProx", "ProximalHooks", "proximal_term"]

MU_KEY = "proximal-mu"


def proximal_term(model: nn.Module, mu: float) -> ExtraLoss | None:
    """FedProx's ``mu / 2 * sum_p ||p - p_global||^2`` as an extra loss, or None when mu is 0.

    Parameters
    ----------
    model : nn.Module
        The model just loaded with the global arrays: its trainable parameters now are
        the anchors ``p_global``.
    mu : float
        Proximal weight, >= 0.

    Raises
    ------
    ValueError
        If ``mu`` is negative or not finite: a negative weight would reward drifting
        away from the global model, so it must not pass for "off".
    """
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"The proximal weight mu must be a finite float >= 0. Got {mu!r} instead.")
    if mu == 0:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]

    def term(_logits: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))

    return term


class ProximalHooks(ClientHooks):
    """FedAvg's client half plus the proximal term (mu from the ``"proximal-mu"`` key)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.mu = float(self.config.get(MU_KEY, 0.0))

    def extra_loss(self, model: nn.Module) -> ExtraLoss | None:
        return proximal_term(model, self.mu)


@register_strategy("fedprox")
class FedProx(MedfedStrategy, flwr_strategy.FedProx):
    """Flower's FedProx with medfed's reply checks and the proximal term at the sites.

    Takes the constructor arguments of ``flwr.serverapp.strategy.FedProx``
    (``proximal_mu``, a finite float >= 0; default 0: plain FedAvg).

    Raises
    ------
    StrategyError
        If ``proximal_mu`` is negative or not finite (Flower takes it and the sites
        then train without the term, as plain FedAvg).
    """

    client_hooks = ProximalHooks

    # wraps: create_strategy reads Flower's signature (names, types) through __wrapped__.
    @functools.wraps(flwr_strategy.FedProx.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_number("fedprox", "proximal_mu", self.proximal_mu, lambda x: x >= 0,
                     "a finite float >= 0 (0 is plain FedAvg)")
