"""Group-aware low-rank adapters (FairLoRA) on a frozen backbone.

FairLoRA (Li et al., "FairFedMed: Benchmarking Group Fairness in Federated Medical
Imaging with FairLoRA", 2025) adapts a frozen pretrained network with, on each target
linear layer ``y = x W + b``, the update

    Delta W = A diag(pi^T S) B * (alpha / r)

where ``A`` (``in x r``, initialised to 0) and ``B`` (``r x out``, initialised normal
with std ``1 / sqrt(r)``, where the authors' code takes std 1) are shared by all patient groups, ``S`` (``G x r``) holds one row of singular values
per group, and ``pi`` (``G``) are the soft group weights of the sample: ``own`` (0.7)
on its group and the rest spread evenly over the others; uniform ``1 / G`` where the
group is unknown (id < 0). ``S`` starts with its first ``r / 2`` entries
``linspace(0.5, 0.1)``, shared by all groups, and its second half a copy of the same
profile, scaled by 0.2 and cyclically shifted right by the group index (so groups start
apart). The authors' code shifts left by ``g * (r / 2) // G``, which gives the same rows
for the default 2 groups at rank 4 (or 2), not for more groups or a higher rank.

:class:`GroupLoRAModel` wraps a backbone without changing its code: the adapters sit
in their own ``ModuleDict`` and are added to the target layers' outputs by forward
hooks, so the backbone's state-dict keys (``backbone.<name>``) stay those of its
checkpoint. MedViTV2's KAN layers hold their weights in a plain ``nn.Linear``
(``FasterKANLayer.linear``), so they are adapted like any other linear layer.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

import torch
from torch import nn

from medfed.errors import MedfedError

__all__ = ["AdapterTargetError", "GroupLoRA", "GroupLoRAModel", "group_weights", "initial_singular_values"]


class AdapterTargetError(MedfedError):
    """No linear layer of the backbone matches the adapter targets (``strategy.params.targets``)."""


def group_weights(groups: torch.Tensor, num_groups: int, own: float = 0.7) -> torch.Tensor:
    """Soft group weights ``pi`` ``[N, G]`` for group ids ``[N]`` (id < 0: unknown).

    ``own`` on the sample's group and ``(1 - own) / (G - 1)`` on each other; ``1 / G``
    everywhere for unknown groups; ``1`` when ``G == 1``.
    """
    groups = groups.reshape(-1).long()
    if (groups >= num_groups).any():
        raise ValueError(
            f"Group id {int(groups.max())} is out of range for {num_groups} groups; raise "
            "strategy.params.num_groups."
        )
    n = groups.shape[0]
    if num_groups == 1:
        return torch.ones(n, 1)
    other = (1.0 - own) / (num_groups - 1)
    weights = torch.full((n, num_groups), other)
    known = groups >= 0
    weights[known, groups[known]] = own
    weights[~known] = 1.0 / num_groups
    return weights


def initial_singular_values(num_groups: int, rank: int) -> torch.Tensor:
    """FairLoRA's initial ``S`` ``[G, r]``: shared first half, shifted and scaled second half."""
    half = rank // 2
    rest = rank - half
    S = torch.empty(num_groups, rank)
    S[:, :half] = torch.linspace(0.5, 0.1, half) if half else torch.empty(0)
    profile = torch.linspace(0.5, 0.1, rest) * 0.2
    for g in range(num_groups):
        S[g, half:] = torch.roll(profile, shifts=g)
    return S


class GroupLoRA(nn.Module):
    """One adapter: ``delta(x, pi) = ((x A) * (pi S)) B * (alpha / r)``.

    Parameters
    ----------
    in_features, out_features : int
        Sizes of the adapted linear layer.
    rank : int
        ``r`` >= 1.
    num_groups : int
        ``G`` >= 1.
    alpha : float
        Scale numerator.

    Shapes
    ------
    ``x`` ``[N, ..., in]``, ``pi`` ``[N, G]`` -> ``[N, ..., out]``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, num_groups: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.zeros(in_features, rank))
        self.B = nn.Parameter(torch.randn(rank, out_features) / rank**0.5)
        self.S = nn.Parameter(initial_singular_values(num_groups, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != pi.shape[0]:
            raise ValueError(
                f"GroupLoRA got {x.shape[0]} rows but group weights for {pi.shape[0]} samples; the "
                "adapted layer must see the batch on its first dimension."
            )
        s = pi.to(x.dtype) @ self.S.to(x.dtype)  # [N, r]
        h = (x @ self.A.to(x.dtype)) * s.view(s.shape[0], *([1] * (x.dim() - 2)), -1)
        return (h @ self.B.to(x.dtype)) * self.scale


class GroupLoRAModel(nn.Module):
    """A frozen backbone with :class:`GroupLoRA` adapters; ``forward(x, groups)``.

    Parameters
    ----------
    backbone : nn.Module
        The pretrained network; its parameters are frozen (except ``trainable``) and
        it always runs in eval mode (BatchNorm statistics stay those of the checkpoint).
    num_groups, rank, alpha
        As for :class:`GroupLoRA`.
    targets : Sequence[str]
        ``fnmatch`` patterns over module names; every ``nn.Linear`` matching one (and
        not in ``trainable``) gets an adapter. ``("*",)``: all of them.
    trainable : Sequence[str]
        Names of modules trained in full (the classifier head).
    own_group_weight : float
        ``pi`` on the sample's own group.

    Raises
    ------
    AdapterTargetError
        If no linear layer (the head aside) matches ``targets``; the one-line message
        names ``strategy.params.targets`` and a few of the layer names.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_groups: int,
        rank: int = 4,
        alpha: float = 2.0,
        targets: Sequence[str] = ("*",),
        trainable: Sequence[str] = ("head",),
        own_group_weight: float = 0.7,
    ) -> None:
        super().__init__()
        if rank < 1 or num_groups < 1:
            raise ValueError(f"GroupLoRAModel needs rank >= 1 and num_groups >= 1. Got {rank}, {num_groups}.")
        self.backbone = backbone
        self.num_groups = num_groups
        self.own_group_weight = own_group_weight
        self.adapters = nn.ModuleDict()
        self._pi: torch.Tensor | None = None
        for param in backbone.parameters():
            param.requires_grad_(False)
        for name in trainable:
            for param in backbone.get_submodule(name).parameters():
                param.requires_grad_(True)
        trainable_prefixes = tuple(f"{name}." for name in trainable)
        linear = [
            (name, module) for name, module in backbone.named_modules()
            if isinstance(module, nn.Linear) and name not in trainable and not name.startswith(trainable_prefixes)
        ]
        for name, module in linear:
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in targets):
                continue
            key = name.replace(".", "__")
            self.adapters[key] = GroupLoRA(module.in_features, module.out_features, rank, num_groups, alpha)
            module.register_forward_hook(self._hook(key))
        if not len(self.adapters):
            raise AdapterTargetError(_no_target_message(targets, [name for name, _ in linear]))

    def _hook(self, key: str):
        def add_adapter(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._pi is None:
                raise RuntimeError("Call GroupLoRAModel(x, groups), not its backbone directly.")
            return output + self.adapters[key](inputs[0], self._pi.to(output.device))

        return add_adapter

    def train(self, mode: bool = True) -> GroupLoRAModel:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps the checkpoint's statistics
        return self

    def forward(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[N, C]`` for images ``x`` and group ids ``groups`` ``[N]`` (None: unknown)."""
        if groups is None:
            groups = torch.full((x.shape[0],), -1, dtype=torch.long)
        self._pi = group_weights(groups.cpu(), self.num_groups, self.own_group_weight)
        try:
            return self.backbone(x)
        finally:
            self._pi = None


def _no_target_message(targets: Sequence[str], linear: Sequence[str]) -> str:
    """One line: the patterns, and one name of each kind of linear layer they could have matched."""
    if not linear:
        return f"strategy.params.targets {list(targets)}: the backbone has no linear layer besides the head to adapt."
    kinds: dict[str, str] = {}
    for name in linear:
        kinds.setdefault(re.sub(r"\d+", "*", name), name)  # stages.0.0.attn.qkv and stages.2.1.attn.qkv: one kind
    examples = ", ".join(repr(name) for name in list(kinds.values())[:6])
    return (
        f"strategy.params.targets {list(targets)} matches no linear layer of the backbone: the fnmatch patterns "
        f"are matched against full module names, such as {examples} ({len(linear)} linear layers besides the "
        "head); e.g. ['*.attn.*'], or null for all of them."
    )
