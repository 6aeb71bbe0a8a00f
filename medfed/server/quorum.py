"""A quorum of sites per round, and waits that always end.

Flower's strategies wait for ``min_available_nodes`` connected nodes with no deadline
(``sample_nodes`` loops on a 1 s sleep), and ``create_strategy`` sets that to the number
of sites, so one hospital offline stops the federation forever. Here:

* :func:`apply_quorum` lowers the strategy's ``min_available_nodes`` /
  ``min_train_nodes`` / ``min_evaluate_nodes`` to the quorum
  (``federation.min_sites``), so that a round can go on without an absent site;
* :class:`QuorumGuard` wraps the strategy. Before a round it waits, at most
  ``federation.round_timeout_s``, for the sites to be connected (for all of them before
  the first round of a ``start`` call, so that every site is sampled when all are up;
  for the quorum later); after training it counts the replies that entered the
  aggregate. Below the quorum it raises :class:`QuorumNotMet` *before* the strategy can
  replace the global model, and the ServerApp retries the round from the last
  checkpoint (``federation.round_retries`` times) or stops with :class:`QuorumError`.
  Evaluation waits as long for the quorum; without it, the round's evaluation is
  skipped. Flower's own sampling is given the nodes counted (:class:`NodeSnapshot`), so
  that a site leaving in between cannot make it wait forever.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from medfed.errors import MedfedError
from medfed.server.delegating_strategy import DelegatingStrategy
from medfed.server.held_out import NodeView

__all__ = ["QuorumError", "QuorumGuard", "QuorumNotMet", "apply_quorum", "quorum_advice", "wait_for_nodes"]

_MINIMUMS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")


class QuorumError(MedfedError):
    """The run stopped: too few sites took part in a round, too many times in a row."""


class QuorumNotMet(Exception):
    """A round had fewer sites than the quorum; the global model was left unchanged.

    Attributes
    ----------
    server_round : int
        True round number.
    sites : int
        Sites connected (before training) or valid training replies (after).
    needed : int
        The quorum.
    stage : str
        ``"connected"`` or ``"valid replies"``.
    """

    def __init__(self, server_round: int, sites: int, needed: int, stage: str) -> None:
        super().__init__(f"round {server_round}: {sites} site(s) {stage}, quorum is {needed}")
        self.server_round = server_round
        self.sites = sites
        self.needed = needed
        self.stage = stage


def apply_quorum(strategy: Strategy, min_sites: int) -> None:
    """Lower the strategy's node minimums (where it has them) to ``min_sites``."""
    for name in _MINIMUMS:
        value = getattr(strategy, name, None)
        if isinstance(value, int) and value > min_sites:
            setattr(strategy, name, min_sites)


def wait_for_nodes(grid: Grid, count: int, timeout_s: float, poll_s: float = 0.5) -> int:
    """Wait until ``count`` nodes are connected or ``timeout_s`` has passed.

    Returns
    -------
    int
        Nodes connected when the wait ended (may be below ``count``).
    """
    deadline = time.monotonic() + timeout_s
    logged = False
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= count or time.monotonic() >= deadline:
            return connected
        if not logged:
            log(INFO, "[medfed] waiting up to %.0f s for %d site(s) to connect (%d connected)",
                timeout_s, count, connected)
            logged = True
        time.sleep(poll_s)


class QuorumGuard(DelegatingStrategy):
    """Delegate to ``strategy``; refuse a round that fewer than ``min_sites`` sites made.

    Parameters
    ----------
    strategy : Strategy
        The experiment's strategy, with :func:`apply_quorum` applied.
    min_sites : int
        The quorum.
    num_sites : int
        Sites in the federation (waited for before the first round).
    timeout_s : float
        Longest wait for sites to connect before a round.
    on_rejected : callable, optional
        Called with ``(node_id, reason)`` for each training reply the strategy left out
        (its ``dropped_replies``), e.g. to record it under the site's name.
    on_evaluation_skipped : callable, optional
        Called with the reason when a round's evaluation is skipped for want of a quorum.
    wait_for_all_first : bool
        Wait for all ``num_sites`` before the first round (simulation: the simulated
        nodes connect while the ServerApp starts). ``medfed server`` waits for the sites
        itself and may start with a quorum, so in deployment only the quorum is awaited.
    """

    def __init__(self, strategy: Strategy, *, min_sites: int, num_sites: int, timeout_s: float,
                 on_rejected: Callable[[int, str], None] | None = None, wait_for_all_first: bool = True,
                 on_evaluation_skipped: Callable[[str], None] | None = None) -> None:
        super().__init__(strategy)
        self.on_rejected = on_rejected
        self.on_evaluation_skipped = on_evaluation_skipped
        self.min_sites = min_sites
        self.num_sites = num_sites
        self.timeout_s = timeout_s
        self._first_round = wait_for_all_first

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        wanted = self.num_sites if self._first_round else self.min_sites
        self._first_round = False
        wait_for_nodes(grid, wanted, self.timeout_s)
        nodes = list(grid.get_node_ids())
        if len(nodes) < self.min_sites:
            raise QuorumNotMet(server_round, len(nodes), self.min_sites, "connected")
        return self.strategy.configure_train(server_round, arrays, config, NodeSnapshot(grid, nodes))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluate on the sites connected within the deadline; skip the round's evaluation
        (the model is kept and checkpointed all the same) when fewer than the quorum are."""
        if getattr(self.strategy, "fraction_evaluate", 1.0) == 0:
            return self.strategy.configure_evaluate(server_round, arrays, config, grid)
        needed = getattr(self.strategy, "min_available_nodes", self.min_sites)
        wait_for_nodes(grid, needed, self.timeout_s)
        nodes = list(grid.get_node_ids())
        if len(nodes) < needed:
            reason = (f"{len(nodes)} site(s) connected for evaluation within {self.timeout_s:g} s, fewer than the "
                      f"quorum ({needed})")
            log(WARNING, "[medfed] round %d: %s; the round's evaluation is skipped", server_round, reason)
            if self.on_evaluation_skipped is not None:
                self.on_evaluation_skipped(reason)
            return []
        return self.strategy.configure_evaluate(server_round, arrays, config, NodeSnapshot(grid, nodes))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        answered = sum(not reply.has_error() for reply in replies)
        if answered < self.min_sites:  # checked first: the strategy's state stays as it was
            raise QuorumNotMet(server_round, answered, self.min_sites, "replied")
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        rejected = dict(getattr(self.strategy, "dropped_replies", {}) or {})
        if self.on_rejected is not None:
            for node_id, reason in rejected.items():
                self.on_rejected(node_id, reason)
        kept = answered - len(rejected)
        if kept < self.min_sites:
            log(WARNING, "[medfed] round %d: %d valid training repl%s, quorum is %d; the global model "
                "is not replaced", server_round, kept, "y" if kept == 1 else "ies", self.min_sites)
            raise QuorumNotMet(server_round, kept, self.min_sites, "valid replies")
        # No arrays from enough valid replies: the strategy keeps the global model this round
        # (a NaN/inf aggregate, which it logged); Flower then goes on with the previous arrays.
        return arrays, metrics


class NodeSnapshot(NodeView):
    """``grid`` with its node list fixed at ``node_ids``.

    Flower's sampling waits, without a deadline, while fewer than its minimum of nodes are
    connected: given the nodes counted after :func:`wait_for_nodes`, it samples at once; a
    site that left since is asked all the same and recorded as dropped out.
    """

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        super().__init__(grid)
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)


def quorum_advice(records: Sequence[dict[str, Any]], server_round: int, resume: str) -> str:
    """What to do after ``server_round`` missed the quorum for good: ``resume`` (the sentence
    that says how to bring the sites back and resume), unless every site left out of the
    round's last attempt had its training diverge, which a resume repeats.

    Parameters
    ----------
    records : sequence of dict
        The run's metrics log (:func:`medfed.server.metrics_log.read_metrics`).
    server_round : int
        The round that missed the quorum.
    resume : str
        The advice when the sites can come back, e.g. "Bring the sites back and resume the run in X."
    """
    last_start = max((i for i, r in enumerate(records) if r["event"] == "start"), default=-1)
    reasons = [str(r.get("reason")) for r in records[last_start + 1:]
               if r["event"] == "dropout" and r.get("round") == server_round]
    # A NaN/inf loss stops a site's training (TrainingDivergedError); NaN/inf weights after
    # its last step get its update rejected ("... holds 3 NaN/inf values").
    if reasons and all("TrainingDivergedError" in reason or "NaN/inf" in reason for reason in reasons):
        # Sites seed their training from (seed, round, site): a resume diverges again.
        # Every retry of the round starts anew ("start" line): the round before is further back.
        before = [r for r in records if r["event"] == "round" and r.get("round") == server_round - 1]
        loss = before[-1].get("evaluate", {}).get("loss", 0.0) if before else 0.0
        if loss is None or not math.isfinite(loss):  # null in metrics.jsonl: not finite
            return (f"Every site's training diverged, starting from a global model whose test loss in round "
                    f"{server_round - 1} was not finite: the aggregate itself diverged. Start a new run (another "
                    "name or output_dir) with a lower train.lr, or the strategy's server learning rate, or turn on "
                    "strategy.clip_update_norm; a resume would repeat the same round.")
        return ("Every site's training diverged (a NaN or infinite loss or update): start a new run (another "
                "name or output_dir) with a lower train.lr; a resume would repeat the same round.")
    said = f" Why: {'; '.join(sorted(set(reasons))[:3])}." if reasons else ""
    return f"{resume}{said}"
