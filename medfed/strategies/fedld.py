"""FedLD (Zeng et al., "Tackling Data Heterogeneity in Federated Learning via Loss
Decomposition", MICCAI 2024, https://arxiv.org/abs/2408.12300).

Client half: the local loss is cross-entropy plus a margin term
``lambda * log(1 + ||softmax(z)||_2^2)``, the norm taken over the batch's whole
``B x C`` softmax matrix (:func:`margin_loss`, ``margin_lambda`` default 0.03), as in
the authors' code. Its pull on each sample therefore shrinks as the batch grows: the
authors trained with batches of 50, medfed's default is 32.

Server half: per floating-point state tensor, the updates ``Delta_i = w_i - w_global``
are combined by :func:`principal_gradient_aggregate` (round 1: their plain mean), which
keeps the principal directions the sites agree on. BatchNorm's running statistics
take the plain mean of the sites' values (``statistics_mean = "sites"``, applied by
:class:`~medfed.strategies.base.MedfedStrategy`): they are estimates, not descent
directions, and the principal-gradient step can push a running variance below zero (NaN
at evaluation; the authors' code steps them too). Integer tensors (BatchNorm counters)
take the rounded mean. As in the authors' code the sites are not weighted by their
sample counts. Where medfed departs from the authors' code: it keeps at least one principal
direction and takes a lone site's update as it is (theirs keeps ``floor(m * 0.8)``
directions, none for one site, whose update is then zero), and an update orthogonal to
a kept direction adds nothing along it (theirs divides 0 by 0: NaN).

The step is much shorter than FedAvg's unless the sites' updates agree: for random
updates about 0.4x the mean's norm with 5 sites; with two sites (one direction kept) a
tensor does not move once the two updates point apart (two unit updates at cosine -0.01:
norm 0.00 against the mean's 0.70), so FedLD with two sites leaves many tensors unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flwr_strategy
from torch import nn

from ._aggregation import is_parameter
from .base import MedfedStrategy
from .hooks import ClientHooks, ExtraLoss
from .registry import check_number, register_strategy

__all__ = ["FedLD", "FedLDHooks", "margin_loss", "principal_gradient_aggregate"]

MARGIN_KEY = "fedld-margin-lambda"


def margin_loss(logits: torch.Tensor, margin_lambda: float) -> torch.Tensor:
    """FedLD's margin term ``lambda * log(1 + ||softmax(logits)||_F^2)``.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, C]`` logits of one batch.
    margin_lambda : float
        Weight ``lambda`` >= 0.

    Returns
    -------
    torch.Tensor
        A scalar; the squared norm runs over all ``B * C`` softmax entries. The paper
        defines it for single-label tasks; on multi-label ones (sigmoid outputs) this
        softmax over the labels is medfed's extension, not measured.
    """
    probabilities = torch.softmax(logits.float(), dim=1)
    return margin_lambda * torch.log1p(probabilities.pow(2).sum())


class FedLDHooks(ClientHooks):
    """FedAvg's client half plus the margin term (lambda from ``"fedld-margin-lambda"``)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.margin_lambda = float(self.config.get(MARGIN_KEY, 0.03))

    def extra_loss(self, model: nn.Module) -> ExtraLoss | None:
        if self.margin_lambda <= 0:
            return None
        weight = self.margin_lambda
        return lambda logits, _targets: margin_loss(logits, weight)


def _gram_float64(delta: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """``delta @ delta.T`` ([m, m]) summed in float64, ``chunk`` columns at a time.

    In float32 a finite but huge update (norm above ~1.8e19) overflows to inf and the SVD
    then makes the whole aggregate NaN; a float64 copy of all of ``delta`` would double
    its memory.
    """
    gram = np.zeros((delta.shape[0], delta.shape[0]))
    for start in range(0, delta.shape[1], chunk):
        block = delta[:, start:start + chunk].astype(np.float64)
        gram += block @ block.T
    return gram


def principal_gradient_aggregate(
    updates: Sequence[np.ndarray], k_proportion: float = 0.8, first_round: bool = False
) -> np.ndarray:
    """FedLD's global update from the sites' updates of one tensor.

    With ``Delta`` the ``m x d`` matrix of flattened updates:

    1. ``G = Delta Delta^T / m`` and its SVD ``G = u diag(s) u^T`` (``m x m``: never
       a ``d x d`` matrix, so 118 M parameters and 10 sites stay cheap);
    2. principal directions ``V = (Delta^T u)^T`` (``m x d``), the top
       ``k = max(1, floor(m * k_proportion))`` kept;
    3. a direction whose inner products with the updates are mostly (more than half)
       negative is flipped;
    4. each update is rebuilt as
       ``||Delta_i|| * sum_{j<k} (s_j / sum_all s) * sign(<Delta_i, v_j>) * v_j / ||v_j||``;
    5. the global update is the mean of the rebuilt updates.

    (Step 3 cannot change step 4, which only sees ``sign(<Delta_i, v_j>) v_j``; it is
    kept to follow the paper.)

    Everything but the last step follows from the ``m x m`` Gram matrix, because
    ``G u_j = s_j u_j``: ``||Delta_i||^2 = m G_ii``, ``<Delta_i, v_j> = m s_j u_ij`` and
    ``||v_j||^2 = m s_j``. The mean of the rebuilt updates is then
    ``w^T Delta`` with ``w = U_k (c / ||v||)`` and
    ``c_j = (s_j / sum s) * mean_i ||Delta_i|| sign(<Delta_i, v_j>)``: two passes over
    the updates (Gram matrix, final combination), no ``m x d`` intermediate besides
    the stacked updates.

    Parameters
    ----------
    updates : Sequence[np.ndarray]
        One update per site, all of the same shape and float dtype.
    k_proportion : float
        Share of the ``m`` directions kept, in (0, 1].
    first_round : bool
        Return the plain mean (the authors' first round, before directions mean much).

    Returns
    -------
    np.ndarray
        The global update, in the shape and dtype of the updates.

    Examples
    --------
    >>> principal_gradient_aggregate([np.array([2.0, 0.0]), np.array([0.0, 1.0])])
    array([0.8, 0. ])
    """
    if len(updates) == 0:
        raise ValueError("principal_gradient_aggregate needs at least one update.")
    if not 0 < k_proportion <= 1:
        raise ValueError(f"k_proportion must be in (0, 1]. Got {k_proportion!r} instead.")
    shape, dtype = np.shape(updates[0]), np.asarray(updates[0]).dtype
    if any(np.shape(u) != shape for u in updates):
        raise ValueError(f"All updates must have shape {shape}; got {[np.shape(u) for u in updates]}.")
    work = np.result_type(dtype, np.float32)
    delta = np.stack([np.asarray(u, dtype=work).reshape(-1) for u in updates])  # [m, d]
    m = delta.shape[0]
    if first_round or m == 1:
        return delta.mean(axis=0).reshape(shape).astype(dtype)

    gram = _gram_float64(delta) / m  # [m, m]
    u, s, _ = np.linalg.svd(gram, hermitian=True)
    s = np.clip(s, 0.0, None)  # round-off can make the smallest slightly negative
    if s.sum() <= 0:  # every update is zero
        return np.zeros(shape, dtype=dtype)
    k = max(1, int(np.floor(m * k_proportion)))
    u_k, s_k = u[:, :k], s[:k]
    projections = m * u_k * s_k  # [m, k]: <Delta_i, v_j> with v_j = Delta^T u_j
    flip = (projections < 0).sum(axis=0) > m / 2
    signs = np.where(flip, -1.0, 1.0)
    u_k, projections = u_k * signs, projections * signs

    update_norms = np.sqrt(np.clip(m * np.diag(gram), 0.0, None))  # [m]
    direction_norms = np.sqrt(m * s_k)  # [k]
    coefficients = (s_k / s.sum()) * (update_norms[:, None] * np.sign(projections)).mean(axis=0)  # [k]
    scale = np.divide(coefficients, direction_norms, out=np.zeros(k), where=direction_norms > 0)
    site_weights = u_k @ scale  # [m]: the result is sum_i site_weights_i Delta_i
    return (site_weights.astype(work) @ delta).reshape(shape).astype(dtype)


@register_strategy("fedld")
class FedLD(MedfedStrategy, flwr_strategy.FedAvg):
    """FedLD: principal-gradient aggregation on the server, margin loss at the sites.

    Parameters
    ----------
    margin_lambda : float
        Weight of the client margin term (authors' default 0.03), finite and >= 0.
    k_proportion : float
        Share of principal directions kept, in (0, 1] (authors: 0.8).
    **kwargs
        Constructor arguments of ``flwr.serverapp.strategy.FedAvg``.

    Raises
    ------
    StrategyError
        If ``margin_lambda`` or ``k_proportion`` is not a number, not finite or out of range.
    """

    client_hooks = FedLDHooks
    #: Running statistics and counters: the plain mean over the sites, as in the authors' code.
    statistics_mean = "sites"

    def __init__(self, *, margin_lambda: float = 0.03, k_proportion: float = 0.8, **kwargs: Any) -> None:
        # 1e400 in YAML is inf: the margin term would make every loss inf.
        check_number("fedld", "margin_lambda", margin_lambda, lambda x: x >= 0, "a finite float >= 0")
        check_number("fedld", "k_proportion", k_proportion, lambda x: 0 < x <= 1, "a float in (0, 1]")
        super().__init__(**kwargs)
        self.margin_lambda = margin_lambda
        self.k_proportion = k_proportion

    def client_params(self) -> dict[str, Any]:
        return {MARGIN_KEY: float(self.margin_lambda)}

    def aggregate_valid_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Principal-gradient step per parameter; the running statistics and counters are
        left out here and get the plain mean in ``aggregate_train`` (``statistics_mean``)."""
        contents = self._answered_contents(replies)
        if not contents:
            return None, None
        records = [next(iter(c.array_records.values())) for c in contents]
        result = ArrayRecord()
        for name, array in records[0].items():
            if not is_parameter(name, array.dtype):
                continue
            previous = self.global_arrays[name].numpy()
            step = principal_gradient_aggregate(
                [record[name].numpy() - previous for record in records], self.k_proportion,
                first_round=server_round == 1,
            )
            result[name] = Array(np.asarray(previous + step, order="C"))
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return result, metrics
