"""FairLoRA (Li et al., "FairFedMed: Benchmarking Group Fairness in Federated Medical
Imaging with FairLoRA", 2025): group-aware low-rank adapters on a frozen backbone.

Client half (:class:`FairLoRAHooks`): the site loads a pretrained MedViTV2 from
``model.init_from`` (the same file must exist at every site), freezes it, and adds a
:class:`~medfed.models.lora.GroupLoRA` adapter to its target linear layers (attention
projections and KAN layers by default, every ``nn.Linear`` but the head). Each
sample's group id selects its soft group weights. Only the adapters and the classifier
head are trained and sent: for ``medvit_v2_nano`` at rank 4 that is about 3 % of
FedAvg's bytes. Sites also report how many samples of each group they hold.

Server half (:class:`FairLoRA`, :func:`fairlora_aggregate`): ``A``, ``B`` and the head
are averaged by sample counts; each row ``S_g`` by that group's counts
``n_{k,g} / sum_k n_{k,g}`` (a group no site holds keeps its previous row); with
``shared_half_s`` the first ``r / 2`` columns are then averaged over the groups; finally
the authors' EMA with the previous global adapters,
``w = (1 - beta_t) w_avg + beta_t w_global`` with ``beta_t = ema_beta_max * (t - 1) / T``
in round ``t`` of ``T`` (their code counts rounds from 0: round 1 is the plain average,
and the last round still moves the model by ``1 - ema_beta_max * (T - 1) / T`` of the
step; ``ema_beta_max`` 0.999 as in their code; 0 turns it off).

Evaluation adds ``es-acc`` and ``es-auc`` (equity-scaled ACC and AUC,
``metric / (1 + sum_g |metric_g - metric|)``) computed from the per-group metrics,
weighted by each site's group counts, to the aggregated evaluation metrics (done by
:class:`~medfed.strategies.base.MedfedStrategy` for every strategy whose sites report
group counts).

Why a pretrained backbone: the adapters are low-rank corrections of features the
backbone already computes; on a randomly initialised, frozen backbone those features
carry little about the images, and a rank-4 correction cannot make up for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import strategy as flwr_strategy
from torch import nn

from medfed.models import create_model
from medfed.models.lora import GroupLoRAModel
from medfed.models.pretrained import PretrainedError, load_pretrained

from ._groups import read_group_counts
from .base import MedfedStrategy
from .hooks import ClientHooks, GlobalModelMismatch, ModelSpec
from .registry import StrategyError, check_number, register_strategy

__all__ = ["FairLoRA", "FairLoRAHooks", "fairlora_aggregate"]

_KEYS = {
    "num_groups": "fairlora-num-groups",
    "rank": "fairlora-rank",
    "alpha": "fairlora-alpha",
    "targets": "fairlora-targets",
    "own_group_weight": "fairlora-own-group-weight",
}
_HEAD = "head"


def fairlora_aggregate(
    site_arrays: Sequence[Mapping[str, np.ndarray]],
    sample_counts: Sequence[float],
    group_counts: np.ndarray,
    previous: Mapping[str, np.ndarray],
    *,
    singular_value_keys: Iterable[str],
    beta: float = 0.0,
    shared_half_s: bool = False,
) -> dict[str, np.ndarray]:
    """FairLoRA's server step on plain arrays.

    Parameters
    ----------
    site_arrays : Sequence[Mapping[str, np.ndarray]]
        Each site's adapters and head (same names and shapes).
    sample_counts : Sequence[float]
        Training samples per site ``[m]``.
    group_counts : np.ndarray
        Training samples per site and group ``[m, G]``.
    previous : Mapping[str, np.ndarray]
        The global arrays the sites started from.
    singular_value_keys : Iterable[str]
        Names of the ``S`` matrices ``[G, r]``; the rest are averaged by sample count.
    beta : float
        EMA weight of ``previous`` in [0, 1].
    shared_half_s : bool
        Average the first ``r // 2`` columns of every ``S`` over the groups.

    Returns
    -------
    dict[str, np.ndarray]
        The new global arrays, in the dtypes of ``previous``.
    """
    m = len(site_arrays)
    weights = np.asarray(sample_counts, dtype=np.float64)
    weights = weights / weights.sum()
    counts = np.asarray(group_counts, dtype=np.float64).reshape(m, -1)
    group_totals = counts.sum(axis=0)
    s_keys = set(singular_value_keys)
    result = {}
    for name, old in previous.items():
        stacked = np.stack([np.asarray(site[name], dtype=np.float64) for site in site_arrays])
        if name in s_keys:
            avg = np.asarray(old, dtype=np.float64).copy()
            held = group_totals > 0
            row_weights = counts[:, held] / group_totals[held]  # [m, G_held]
            avg[held] = np.einsum("mg,mgr->gr", row_weights, stacked[:, held])
            if shared_half_s and held.any():
                # The shared half is the mean over the groups some site trained; a group no
                # site holds would pull it back to its old row every round.
                half = avg.shape[1] // 2
                avg[:, :half] = avg[held, :half].mean(axis=0, keepdims=True)
        else:
            avg = np.tensordot(weights, stacked, axes=1)
        new = (1.0 - beta) * avg + beta * np.asarray(old, dtype=np.float64)
        result[name] = new.astype(np.asarray(old).dtype)
    return result


class FairLoRAHooks(ClientHooks):
    """Frozen pretrained backbone + group adapters; adapters and head travel."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.num_groups = int(self.config.get(_KEYS["num_groups"], 2))
        self.rank = int(self.config.get(_KEYS["rank"], 4))
        self.alpha = float(self.config.get(_KEYS["alpha"], 2.0))
        self.targets = tuple(self.config.get(_KEYS["targets"], ["*"]))
        self.own_group_weight = float(self.config.get(_KEYS["own_group_weight"], 0.7))

    def model_key(self) -> tuple:
        return (self.num_groups, self.rank, self.alpha, self.targets, self.own_group_weight)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        if spec.init_from is None:
            raise PretrainedError(
                "Strategy 'fairlora' adapts a pretrained backbone: set model.init_from to a 'medfed train' "
                "or 'medfed simulate' output (model.safetensors or its run folder)."
            )
        backbone = create_model(spec.name, num_classes=spec.num_classes, in_chans=spec.in_chans, img_size=spec.img_size)
        load_pretrained(backbone, spec.init_from, spec.init_sha256)
        return GroupLoRAModel(
            backbone, num_groups=self.num_groups, rank=self.rank, alpha=self.alpha, targets=self.targets,
            trainable=(_HEAD,), own_group_weight=self.own_group_weight,
        )

    def initial_arrays(self, spec: ModelSpec) -> dict[str, torch.Tensor]:
        return self.sent_arrays(self.build_model(spec))

    def load_global(
        self, model: nn.Module, arrays: Mapping[str, torch.Tensor], local_state: Mapping[str, torch.Tensor]
    ) -> None:
        expected = set(self.sent_arrays(model))
        if set(arrays) != expected:
            missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
            raise GlobalModelMismatch(
                f"FairLoRA expects the adapters and head only; the global arrays lack {missing[:3]} and have "
                f"{extra[:3]} besides. Do the strategy's params match model.init_from?"
            )
        try:
            model.load_state_dict(dict(arrays), strict=False)
        except RuntimeError as error:  # shapes: another rank or number of groups at the server
            raise GlobalModelMismatch.from_load_error(error) from None

    def forward(self, model: nn.Module, images: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        return model(images, groups)

    def sent_arrays(self, model: nn.Module) -> dict[str, torch.Tensor]:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in trainable}


@register_strategy("fairlora")
class FairLoRA(MedfedStrategy, flwr_strategy.FedAvg):
    """FairLoRA's server half; its client half is :class:`FairLoRAHooks`.

    Parameters
    ----------
    num_groups : int
        Number of patient groups ``G`` (group ids ``0 .. G-1``).
    rank : int
        Adapter rank ``r`` >= 1.
    alpha : float
        Adapter scale numerator (``Delta W`` is scaled by ``alpha / r``), finite and > 0.
    targets : list of str or None
        ``fnmatch`` patterns over the backbone's module names selecting the adapted
        linear layers (KAN layers included); None: every linear layer but the head.
        E.g. ``["*.attn.*", "*.mhsa.*"]`` for attention projections only.
    own_group_weight : float
        Soft weight of a sample's own group, in (0, 1].
    shared_half_s : bool
        Average the first ``rank // 2`` singular values over the groups each round
        (needs ``rank`` >= 2: with rank 1 there is nothing to share).
    ema_beta_max : float
        ``beta_t = ema_beta_max * (t - 1) / num_rounds`` in round ``t``, in [0, 1); 0 turns the EMA off.
    num_rounds : int
        Rounds of the run (set from the experiment's ``rounds``).
    **kwargs
        Constructor arguments of ``flwr.serverapp.strategy.FedAvg``.

    Raises
    ------
    StrategyError
        If a parameter has the wrong type, is not finite or is out of range, or
        ``shared_half_s`` is set with ``rank`` 1.
    """

    client_hooks = FairLoRAHooks
    partial_replies = False  # its hooks choose what travels: all of the global arrays

    def __init__(
        self,
        *,
        num_groups: int = 2,
        rank: int = 4,
        alpha: float = 2.0,
        targets: list[str] | None = None,
        own_group_weight: float = 0.7,
        shared_half_s: bool = False,
        ema_beta_max: float = 0.999,
        num_rounds: int = 1,
        **kwargs: Any,
    ) -> None:
        # 1e400 in YAML is inf: alpha = inf made every adapter output inf or NaN.
        for name, value, integer, in_range, what in (
            ("num_groups", num_groups, True, lambda x: x >= 1, "an int >= 1"),
            ("rank", rank, True, lambda x: x >= 1, "an int >= 1"),
            ("alpha", alpha, False, lambda x: x > 0, "a finite float > 0"),
            ("own_group_weight", own_group_weight, False, lambda x: 0 < x <= 1, "a float in (0, 1]"),
            ("ema_beta_max", ema_beta_max, False, lambda x: 0 <= x < 1, "a float in [0, 1)"),
            ("num_rounds", num_rounds, True, lambda x: x >= 1, "an int >= 1"),
        ):
            check_number("fairlora", name, value, in_range, what, integer=integer,
                         key="rounds" if name == "num_rounds" else None)
        if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
            raise StrategyError(
                "The 'targets' parameter of strategy 'fairlora' (strategy.params.targets) must be a list of str "
                f"or null. Got {targets!r} instead."
            )
        if not isinstance(shared_half_s, bool):
            raise StrategyError(
                "The 'shared_half_s' parameter of strategy 'fairlora' (strategy.params.shared_half_s) must be a "
                f"bool. Got {shared_half_s!r} instead."
            )
        if shared_half_s and rank // 2 == 0:
            raise StrategyError(
                "strategy.params.shared_half_s needs strategy.params.rank >= 2: it averages the first rank // 2 "
                f"singular values over the groups, and rank {rank} has none to share; raise rank or set "
                "shared_half_s to false."
            )
        super().__init__(**kwargs)
        self.num_groups, self.rank, self.alpha = num_groups, rank, alpha
        self.targets = list(targets) if targets else ["*"]
        self.own_group_weight = own_group_weight
        self.shared_half_s, self.ema_beta_max, self.num_rounds = shared_half_s, ema_beta_max, num_rounds

    def client_params(self) -> dict[str, Any]:
        return {
            _KEYS["num_groups"]: self.num_groups, _KEYS["rank"]: self.rank, _KEYS["alpha"]: float(self.alpha),
            _KEYS["targets"]: list(self.targets), _KEYS["own_group_weight"]: float(self.own_group_weight),
        }

    def aggregate_valid_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        contents = self._answered_contents(replies)
        if not contents:
            return None, None
        records = [next(iter(c.array_records.values())) for c in contents]
        metrics = [next(iter(c.metric_records.values())) for c in contents]
        previous = {name: array.numpy() for name, array in self.global_arrays.items()}
        group_counts = np.stack([read_group_counts(m, self.num_groups) for m in metrics])
        if not group_counts.any():
            log(WARNING, "FairLoRA: round %s: no site reports a sample of any patient group, so the "
                "per-group singular values keep their values; declare federation.groups (simulation) or "
                "give each site folder's labels.csv a 'group' column.", server_round)
        new = fairlora_aggregate(
            [{name: array.numpy() for name, array in record.items()} for record in records],
            [float(m[self.weighted_by_key]) for m in metrics],
            group_counts,
            previous,
            singular_value_keys=[name for name in previous if name.endswith(".S")],
            beta=self.ema_beta_max * min(server_round - 1, self.num_rounds) / self.num_rounds,
            shared_half_s=self.shared_half_s,
        )
        arrays = ArrayRecord({name: Array(np.asarray(value, order="C")) for name, value in new.items()})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
