"""The client half of a strategy plug-in: what a site does differently for it.

The ClientApp builds the model, loads the global arrays, trains and replies the same
way for every strategy, and asks the strategy's :class:`ClientHooks` at each step where
strategies differ:

============================  ==========================================================
hook                          used for
============================  ==========================================================
:meth:`~ClientHooks.build_model`     the site's network (FairLoRA: frozen backbone +
                                     adapters)
:meth:`~ClientHooks.load_global`     put the received arrays (and what the site kept)
                                     into the model (FedBN: own BatchNorm)
:meth:`~ClientHooks.forward`         logits of a batch (FairLoRA: with group ids)
:meth:`~ClientHooks.extra_loss`      a term added to the loss (FedProx, FedLD)
:meth:`~ClientHooks.sent_arrays`     what travels back (FairLoRA: adapters and head)
:meth:`~ClientHooks.local_state`     what stays at the site until the next round
:meth:`~ClientHooks.reply_metrics`   extra metrics for the server (every site sends
                                     per-group counts of the study's groups anyway)
:meth:`~ClientHooks.before_evaluation`  fit what the site owns but never trained
                                     (FedBN: BatchNorm statistics at an unseen site)
============================  ==========================================================

A hooks object is built per message from the instruction's ConfigRecord (the
strategy's :meth:`~medfed.strategies.base.MedfedStrategy.client_params`), so it
carries the round's settings and nothing else: all state a site keeps between rounds
goes through :meth:`~ClientHooks.local_state` (held in the site's ``context.state`` and
on disk by the ClientApp), never in a hooks object or a cached model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medfed.errors import MedfedError
from medfed.models import create_model
from medfed.models.pretrained import load_pretrained

__all__ = ["ClientHooks", "ExtraLoss", "GlobalModelMismatch", "ModelSpec"]

#: ``f(logits [B, C], targets) -> scalar`` added to the training loss.
ExtraLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GlobalModelMismatch(MedfedError):
    """The global arrays a site received do not fit the model it builds: the server and the
    site run different medfed versions or study settings. Its text names arrays and
    shapes only, which the server may be told."""

    @classmethod
    def from_load_error(cls, error: RuntimeError) -> GlobalModelMismatch:
        """From torch's ``load_state_dict`` error, which names the missing, unexpected and
        misshapen arrays (on one line, shortened)."""
        return cls(" ".join(str(error).split())[:400])


#: The instruction config key of the SHA-256 of the server's ``model.init_from`` checkpoint.
INIT_DIGEST_KEY = "init-from-sha256"


@dataclass(frozen=True)
class ModelSpec:
    """What a model is built from: registry name, sizes, and an optional checkpoint.

    Attributes
    ----------
    name : str
        Registered model name (``medfed.models.list_models()``).
    num_classes, in_chans, img_size : int
        Outputs, input channels and input side in pixels.
    init_from : str or None
        ``model.init_from``: a ``model.safetensors`` file or a run folder holding one.
    init_sha256 : str or None
        At a site: the SHA-256 of the server's ``init_from`` checkpoint, which a site's
        file must match (:func:`medfed.models.pretrained.load_pretrained`).
    """

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    init_from: str | None = None
    init_sha256: str | None = None


class ClientHooks:
    """FedAvg's client half: the whole model travels, nothing stays at the site.

    Parameters
    ----------
    config : Mapping[str, Any]
        The instruction's ConfigRecord (or the strategy's ``client_params()`` on the
        server); subclasses read their keys from it.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    # --- model ------------------------------------------------------------------------
    def model_key(self) -> tuple:
        """Settings that change the model's structure (part of the model cache key)."""
        return ()

    def build_model(self, spec: ModelSpec) -> nn.Module:
        """The network a site trains (weights are overwritten by :meth:`load_global`)."""
        return create_model(spec.name, num_classes=spec.num_classes, in_chans=spec.in_chans, img_size=spec.img_size)

    def initial_arrays(self, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """The first global arrays (server side; seed torch first): the whole state of a
        fresh model, or of ``spec.init_from`` when set."""
        model = self.build_model(spec)
        if spec.init_from is not None:
            load_pretrained(model, spec.init_from)
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def load_global(
        self, model: nn.Module, arrays: Mapping[str, torch.Tensor], local_state: Mapping[str, torch.Tensor]
    ) -> None:
        """Load the received global arrays (all of the model's state), then ``local_state``."""
        try:
            model.load_state_dict(dict(arrays), strict=True)
        except RuntimeError as error:
            raise GlobalModelMismatch.from_load_error(error) from None
        if local_state:
            model.load_state_dict(dict(local_state), strict=False)

    # --- training ---------------------------------------------------------------------
    def forward(self, model: nn.Module, images: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of a batch; ``groups`` ``[B]`` (-1 = unknown) unused here."""
        return model(images)

    def extra_loss(self, model: nn.Module) -> ExtraLoss | None:
        """A term added to the training loss (called after :meth:`load_global`), or None."""
        return None

    # --- evaluation ---------------------------------------------------------------------
    def before_evaluation(
        self, model: nn.Module, local_state: Mapping[str, torch.Tensor], images: Iterable[torch.Tensor],
        device: torch.device,
    ) -> str | None:
        """Adapt the loaded model to the site before it is evaluated; here nothing.

        ``local_state`` is what the site kept (empty at a site that never trained, and for
        ``medfed evaluate``); ``images`` yields ``[B, C, H, W]`` batches of the site's
        training split, unlabeled and unaugmented, read only if a hook iterates it; the
        model is on ``device``. Returns one line saying what was fitted (logged by the
        caller), or None.
        """
        return None

    # --- reply ------------------------------------------------------------------------
    def sent_arrays(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What the site sends back: here its whole state dict."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def local_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What the site keeps for the next round (passed back to :meth:`load_global`)."""
        return {}

    def reply_metrics(self, groups: Any) -> dict[str, int | float]:
        """Extra MetricRecord entries of a reply, from the split's group ids ``[N]``."""
        return {}
