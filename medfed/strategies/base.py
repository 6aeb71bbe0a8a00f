"""What every medfed strategy does around its aggregation: the plug-in's server half.

:class:`MedfedStrategy` is a mixin placed before a Flower strategy class
(``class FedBN(MedfedStrategy, flwr_strategy.FedAvg)``). It adds, for every strategy
alike (the registry wraps Flower's own classes and users' classes with it too):

* **Reply checks.** Before the strategy's own ``aggregate_train`` sees them, replies
  with NaN/inf arrays, arrays the global model lacks or holds in another shape or dtype,
  other array or metric names than most replies, a bad weight or group count, or (with
  ``ReplyPolicy.max_update_norm_z``) an update norm far above the others' are dropped
  with a WARNING; :attr:`MedfedStrategy.dropped_replies` tells the server which.
  Evaluation replies whose metrics cannot be averaged with the others' are dropped
  before ``aggregate_evaluate`` the same way.
* **Norm clipping** (``ReplyPolicy.clip_update_norm``): each kept update of the
  parameters ``w_i - w_global`` is scaled down to that norm before aggregation.
  Update norms, for clipping and the outlier check, run over the parameters only:
  BatchNorm's running statistics (which follow a site's image intensities and can move far
  more than the weights) and integer counters neither count nor get clipped.
* **BatchNorm statistics.** Where the strategy's server step is not a plain mean
  (Flower's FedAdam, FedYogi, FedAdagrad, FedAvgM with server momentum or learning
  rate, FedLD), BatchNorm's running means and variances and integer arrays (its
  ``num_batches_tracked`` counters) take the mean of the kept replies instead
  (:attr:`MedfedStrategy.statistics_mean`): a server optimiser would step them as
  weights, drive a running variance below zero (NaN at evaluation) and never move a
  counter.
* **Partial updates.** Sites of some strategies send only part of the model (FedBN
  keeps BatchNorm at home, FairLoRA sends adapters and head): the aggregate is merged
  into the previous global arrays, so the global ArrayRecord stays complete.
* **Client settings.** :meth:`MedfedStrategy.client_params` (the strategy's
  client-side hyper-parameters, e.g. FedProx's mu) are added to the config of every
  train and evaluate instruction: the experiment config is their only source, the
  strategy their only carrier.
* **Fairness metrics.** Where sites report per-group counts, evaluation adds
  group-count-weighted per-group metrics and ES-ACC / ES-AUC.
* **Client hooks.** :attr:`MedfedStrategy.client_hooks` names the plug-in's client
  half (:class:`medfed.strategies.hooks.ClientHooks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy

# Not re-exported by flwr.serverapp.strategy: the base of FedAdam, FedYogi, FedAdagrad.
from flwr.serverapp.strategy.fedopt import FedOpt

from medfed.transfer import numpy_arrays

from ._aggregation import mean_of_statistics
from ._groups import equity_scaled_metrics
from ._validation import (
    clip_update,
    find_invalid_evaluate_replies,
    find_invalid_replies,
    find_norm_outliers,
    update_norm,
)
from .hooks import ClientHooks
from .state import StrategyStateError, load_strategy_state, strategy_state

__all__ = ["MedfedStrategy", "ReplyPolicy"]


@dataclass(frozen=True)
class ReplyPolicy:
    """How strictly replies are screened, beyond the always-on checks.

    Attributes
    ----------
    max_update_norm_z : float or None
        Drop a reply whose update norm ``||w_i - w_global||`` (over the parameters,
        not BatchNorm's running statistics or counters) lies more than this many
        robust standard deviations above the median of the round's replies
        (:func:`~medfed.strategies._validation.find_norm_outliers`; needs >= 3
        replies). None (the default) turns the check off: a site with more data takes
        more steps and moves further, so with few sites an honest large site is flagged
        (it dropped 11 honest site-rounds in 10 of the 36 runs of
        ``benchmarks/bench_strategies.py``).
    clip_update_norm : float or None
        Scale every update of the parameters down to at most this L2 norm before
        aggregation; BatchNorm's running statistics and counters are neither counted
        nor scaled. None turns clipping off.
    """

    max_update_norm_z: float | None = None
    clip_update_norm: float | None = None


class MedfedStrategy:
    """Mixin that makes a Flower strategy a medfed plug-in (see the module docstring).

    Attributes
    ----------
    client_hooks : type[ClientHooks]
        The plug-in's client half; plain :class:`ClientHooks` (FedAvg's) by default.
    reply_policy : ReplyPolicy
        Set by :func:`~medfed.strategies.create_strategy` from the experiment config.
    dropped_replies : Mapping[int, str]
        Node id -> reason, for the replies the latest ``aggregate_train`` left out.
    partial_replies : bool or None
        Whether the sites may send only some of the global arrays (FedBN keeps its
        BatchNorm, Local-only sends none). When not, a reply that lacks an array of the
        global model is dropped, even when most replies lack it (Flower's FedOpt stops
        the run on such an aggregate). None (the default): when the client hooks choose
        what travels (override ``sent_arrays``).
    model_kept : str or None
        Why the latest ``aggregate_train`` returned no arrays though valid replies were
        left (the round keeps the global model, and the strategy's state is put back as
        it was before the round), e.g. an aggregate that is not finite; None otherwise.
    global_arrays : ArrayRecord or None
        The arrays of the round being trained (set by ``configure_train``): the
        reference of update norms, clipping and partial updates.
    statistics_mean : {"examples", "sites"} or None
        How BatchNorm's running statistics and the integer/bool arrays (counters) of
        the new global model are computed, in place of the strategy's own value for
        them: ``"examples"``, the example-weighted mean of the kept replies (FedAvg's
        rule, the same arithmetic); ``"sites"``, their plain mean. Where the strategy
        keeps its own copy of the current arrays (``current_arrays``: FedOpt's dict,
        FedAvgM's ArrayRecord), that copy holds these means as well, before the step
        (the server optimiser then sees no update of them, and its moments stay zero
        there) and after it. None (the default): ``"examples"`` for Flower's server
        optimisers (FedAdam, FedYogi, FedAdagrad; FedAvgM with a server momentum or
        learning rate), the strategy's own aggregation for every other strategy (FedAvg,
        FedMedian, FedTrimmedAvg... keep their running statistics valid themselves).
    """

    client_hooks: ClassVar[type[ClientHooks]] = ClientHooks
    partial_replies: ClassVar[bool | None] = None
    reply_policy: ReplyPolicy = ReplyPolicy()
    dropped_replies: Mapping[int, str] = MappingProxyType({})
    model_kept: str | None = None
    global_arrays: ArrayRecord | None = None
    statistics_mean: ClassVar[str | None] = None

    @classmethod
    def sends_partial_replies(cls) -> bool:
        """Whether a reply may hold only some of the global arrays (see ``partial_replies``)."""
        if cls.partial_replies is not None:
            return cls.partial_replies
        return cls.client_hooks.sent_arrays is not ClientHooks.sent_arrays

    def client_params(self) -> dict[str, Any]:
        """Client-side hyper-parameters sent with every instruction (ConfigRecord values).

        Returns
        -------
        dict[str, Any]
            Kebab-case key -> bool, int, float, str or list of those; ``{}`` here.
        """
        return {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the round's global arrays, add :meth:`client_params`, then sample as Flower does."""
        self.global_arrays = arrays
        for key, value in self.client_params().items():
            config[key] = value
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Add :meth:`client_params` (e.g. FairLoRA's adapter shape), then as Flower does."""
        for key, value in self.client_params().items():
            config[key] = value
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop bad replies (WARNING each), clip, aggregate the rest, merge into the global arrays.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The new global arrays and the training metrics, or ``(None, None)`` when
            no valid reply is left (Flower then keeps the previous global arrays).
        """
        replies = list(replies)
        answered = [msg for msg in replies if not msg.has_error()]
        invalid = find_invalid_replies(
            [msg.content for msg in answered], getattr(self, "weighted_by_key", "num-examples"),
            reference=None if self.global_arrays is None else
            {name: (array.shape, array.dtype) for name, array in self.global_arrays.items()},
            whole=not self.sends_partial_replies(),
        )
        invalid.update(self._norm_outliers(answered, invalid))

        dropped: dict[int, str] = {}
        for index, reason in sorted(invalid.items()):
            node_id = answered[index].metadata.src_node_id
            dropped[node_id] = reason
            log(WARNING, "aggregate_train: round %s: dropping the reply of node %s: %s.",
                server_round, node_id, reason)
        # An instance attribute shadows the empty class-level default.
        self.dropped_replies = MappingProxyType(dropped)
        if invalid and len(invalid) == len(answered):
            log(WARNING, "aggregate_train: round %s: no valid reply left after dropping %s; the "
                "global arrays stay unchanged this round.", server_round, len(invalid))

        dropped_messages = {id(answered[index]) for index in invalid}
        kept = [msg for msg in replies if id(msg) not in dropped_messages]
        self._clip(kept)
        before = strategy_state(self)
        statistics = self._mean_of_statistics(kept)
        self._put_into_current_arrays(statistics)
        arrays, metrics = self.aggregate_valid_replies(server_round, kept)
        arrays = self._complete(_replaced(arrays, statistics))
        if arrays is not None:
            self._put_into_current_arrays({name: arrays[name].numpy() for name in statistics if name in arrays})
        # Finite replies can still overflow an aggregation (FedLD's Gram matrix, a sum near
        # float32's limit) or the state a strategy carries to the next round (FedAdam's
        # second moment, FedAvgM's momentum): a NaN model would end the study, an inf moment
        # freeze its weights for good. The round then keeps the model and the state.
        self.model_kept = None
        if arrays is not None and not _all_finite(arrays):
            self.model_kept = "the aggregate of the valid replies is not finite (NaN/inf)"
        elif not _all_finite(strategy_state(self, copy=False)):
            self.model_kept = f"{type(self).__name__}'s state after aggregation is not finite (NaN/inf)"
        if self.model_kept is not None:
            try:
                load_strategy_state(self, before)
            except StrategyStateError as error:  # a plug-in with state_dict() but no load_state_dict()
                log(WARNING, "aggregate_train: round %s: %s's state cannot be put back (%s); it goes on from "
                    "the state of this round.", server_round, type(self).__name__, error)
            log(WARNING, "aggregate_train: round %s: %s; the global model and the strategy's state stay as they "
                "were this round.", server_round, self.model_kept)
            return None, metrics
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The strategy's aggregate plus, where sites report group counts, per-group
        metrics weighted by those counts and ``es-acc`` / ``es-auc``."""
        replies = list(replies)
        answered = [msg for msg in replies if not msg.has_error()]
        invalid = find_invalid_evaluate_replies(
            [msg.content for msg in answered], getattr(self, "weighted_by_key", "num-examples")
        )
        for index, reason in invalid.items():
            log(WARNING, "aggregate_evaluate: round %s: dropping the reply of node %s: %s.",
                server_round, answered[index].metadata.src_node_id, reason)
        dropped = {id(answered[index]) for index in invalid}
        replies = [msg for msg in replies if id(msg) not in dropped]
        aggregated = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        if aggregated is None:
            return None
        records = [dict(next(iter(m.content.metric_records.values()))) for m in replies if not m.has_error()]
        for key, value in equity_scaled_metrics(aggregated, records).items():
            aggregated[key] = value
        return aggregated

    def aggregate_valid_replies(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's own aggregation of checked replies (Flower's by default)."""
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    # ----------------------------------------------------------------------------------
    def _answered_contents(self, replies: list[Message]) -> list[RecordDict]:
        """The contents of the replies without an error, for an aggregation that needs the
        round's global arrays (set by :meth:`configure_train`)."""
        contents = [msg.content for msg in replies if not msg.has_error()]
        if contents and self.global_arrays is None:
            raise RuntimeError(f"{type(self).__name__}.aggregate_train needs configure_train first "
                               "(it sets the global arrays).")
        return contents

    def _reference(self) -> dict[str, np.ndarray] | None:
        if self.global_arrays is None:
            return None
        return numpy_arrays(self.global_arrays)

    def _norm_outliers(self, answered: list[Message], invalid: Mapping[int, str]) -> dict[int, str]:
        max_z = self.reply_policy.max_update_norm_z
        reference = self._reference()
        if max_z is None or reference is None:
            return {}
        indices = [index for index in range(len(answered)) if index not in invalid]
        norms = [update_norm(_arrays_of(answered[index]), reference) for index in indices]
        return {indices[i]: reason for i, reason in find_norm_outliers(norms, max_z).items()}

    def _clip(self, kept: list[Message]) -> None:
        max_norm = self.reply_policy.clip_update_norm
        reference = self._reference()
        if max_norm is None or reference is None:
            return
        for msg in kept:
            if msg.has_error():
                continue
            name = next(iter(msg.content.array_records))
            clipped = clip_update(_arrays_of(msg), reference, max_norm)
            msg.content[name] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in clipped.items()})

    def _statistics_rule(self) -> str | None:
        if self.statistics_mean is not None:
            return self.statistics_mean
        if isinstance(self, FedOpt):
            return "examples"
        if isinstance(self, flwr_strategy.FedAvgM) and self.server_opt:
            return "examples"
        return None

    def _mean_of_statistics(self, kept: list[Message]) -> dict[str, np.ndarray]:
        """The running statistics' and counters' means over ``kept`` (``statistics_mean``)."""
        rule = self._statistics_rule()
        if rule is None:
            return {}
        if rule not in ("examples", "sites"):
            raise ValueError(f"{type(self).__name__}.statistics_mean must be 'examples', 'sites' or None. "
                             f"Got {rule!r} instead.")
        weighted_by_key = getattr(self, "weighted_by_key", "num-examples") if rule == "examples" else None
        return mean_of_statistics([msg.content for msg in kept if not msg.has_error()], weighted_by_key)

    def _put_into_current_arrays(self, values: Mapping[str, np.ndarray]) -> None:
        """Give the server optimiser's copy of the current arrays (FedOpt's dict, FedAvgM's
        ArrayRecord) ``values``, in a new container: FedAvgM's may be the round's global
        ArrayRecord itself."""
        current = getattr(self, "current_arrays", None)
        if not values or current is None:
            return
        if isinstance(current, ArrayRecord):
            self.current_arrays = ArrayRecord({
                name: Array(np.asarray(values[name], order="C")) if name in values else array
                for name, array in current.items()
            })
        elif isinstance(current, dict):
            self.current_arrays = {name: values.get(name, array) for name, array in current.items()}

    def _complete(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """Arrays the sites did not send keep their previous global value; the others keep
        its dtype (Flower's mean turns BatchNorm's int64 counters into float64, and the
        next round's replies would then not fit the global model)."""
        if arrays is None or self.global_arrays is None:
            return arrays
        merged = ArrayRecord()
        for name, previous in self.global_arrays.items():
            merged[name] = _in_dtype(arrays[name], previous.dtype) if name in arrays else previous
        return merged


def _replaced(arrays: ArrayRecord | None, values: Mapping[str, np.ndarray]) -> ArrayRecord | None:
    """``arrays`` with the entries of ``values`` put in (added where ``arrays`` lacks them)."""
    if arrays is None or not values:
        return arrays
    replaced = ArrayRecord({
        name: Array(np.asarray(values[name], order="C")) if name in values else array
        for name, array in arrays.items()
    })
    for name, value in values.items():
        if name not in replaced:
            replaced[name] = Array(np.asarray(value, order="C"))
    return replaced


def _in_dtype(array: Array, dtype: str) -> Array:
    if array.dtype == dtype:
        return array
    values = array.numpy()
    if not np.issubdtype(np.dtype(dtype), np.inexact):
        values = np.rint(values)
    # np.asarray, not np.ascontiguousarray, which makes a 0-d counter 1-d.
    return Array(np.asarray(values.astype(dtype), order="C"))


def _arrays_of(msg: Message) -> dict[str, np.ndarray]:
    return numpy_arrays(next(iter(msg.content.array_records.values())))


def _all_finite(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> bool:
    """Whether every floating-point array of ``arrays`` holds only finite values."""
    for array in arrays.values():
        values = array.numpy() if isinstance(array, Array) else np.asarray(array)
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return False
    return True
