"""What the server records while Flower's ``Strategy.start`` runs the rounds.

Flower's round loop is used as it is (never forked). Two thin wrappers observe it:

* :class:`RecordingGrid` wraps the Grid the ServerApp receives. ``send_and_receive``
  counts the array payload bytes of every message and reply, writes one ``"site"`` line
  per reply to ``metrics.jsonl`` and returns the replies sorted by site name, so that
  the aggregation sums them in the same order in every run (float addition is not
  associative: this order is what makes a CPU run repeat bit for bit).
* :class:`RoundRecorder` keeps the current round's clock, byte counters and aggregated
  metrics (reported by :class:`medfed.server.resume.RoundOffsetStrategy`) and writes the
  ``"round"`` line when the round ends.

Replies identify their site through a ConfigRecord ``"site"`` (``{"name", "time-s",
"held-out"}``) that medfed's ClientApp adds; replies without it are named ``node-<id>``.

Two kinds of global test figures go into each round line, named apart:

* ``"evaluate"``: the strategy's aggregate, i.e. the **sample-weighted mean of the
  per-site metrics** (a site's AUC weighted by its test size; ``acc-group-<g>``
  weighted by the sites' ``num-examples-group-<g>`` counts, with ``es-acc`` /
  ``es-auc`` from those: :func:`medfed.strategies._groups.equity_scaled_metrics`);
* ``"evaluate_pooled"``: the metrics of the **pooled test set** (the union of the
  training sites' test sets): ACC and balanced ACC exact from the summed confusion
  matrices, AUC from the summed score histograms (:mod:`medfed.data.pooled`, with
  ``auc_error_bound``); per patient group ``acc_group_<g>``/``auc_group_<g>`` likewise,
  and the equity-scaled ``es_acc`` = ACC / (1 + sum_g |ACC_g - ACC|) and ``es_auc``.

Held-out sites (``"held-out": true``) are left out of both; their sample-weighted mean
goes to ``"held_out"`` and their site lines carry ``"held_out": true``.

A site that was sent a message but replied with an error, or not at all before the
round's deadline (``federation.round_timeout_s``), gets a ``"dropout"`` line
(``{"event": "dropout", "round", "phase", "site", "reason"}``). Its name comes from an
earlier reply of that node or from the name it was registered under at the SuperLink.

In deployment (a SuperLink behind the Grid), :class:`RecordingGrid` waits for replies
with its own short poll (``poll_interval_s``) built on the Grid's public
``push_messages``/``pull_messages``, instead of Flower's ``send_and_receive``, which
sleeps 3 s between pulls; a transient server error (HTTP 5xx: the SuperLink's SQLite
state locked under load) is retried instead of ending the run.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from medfed.server.grid import DelegatingGrid
from medfed.strategies._groups import GROUP_COUNT_PREFIX
from medfed.strategies._validation import find_invalid_evaluate_replies
from medfed.server.metrics_log import MetricsLog

__all__ = ["RecordingGrid", "RoundRecorder", "payload_bytes", "pooled_round_metrics", "site_name"]

#: Keys of a reply's MetricRecord that are not metrics.
_NOT_METRICS = ("num-examples", "confusion", "num-classes")
_GROUP = re.compile(r"^(acc|auc)-group-(\d+)$")


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (what dominates the traffic)."""
    return sum(record.count_bytes() for record in content.array_records.values())


def site_text(text: str, limit: int = 300) -> str:
    """Text that a site sent (its name, an error), safe to print and log: control
    characters, a terminal's escape codes among them, become ``?``; cut to ``limit``."""
    printable = "".join(c if c.isprintable() else "?" for c in text)
    return printable if len(printable) <= limit else printable[:limit - 3] + "..."


def site_name(reply: Message) -> str:
    """The site name a reply carries, else ``node-<source node id>``."""
    if not reply.has_error() and "site" in reply.content.config_records:
        name = reply.content.config_records["site"].get("name")
        if isinstance(name, str) and name:
            return site_text(name, 100)
    return f"node-{reply.metadata.src_node_id}"


def _retry_transient(call, what: str, attempts: int = 6):
    """``call()``, retried with back-off when the SuperLink answers 5xx or cannot be reached.

    An overloaded SuperLink answers 500 when its SQLite state stays locked for more
    than 5 s ("database is locked"); the write was rolled back, so asking again is safe.
    """
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - filtered just below
            if attempt == attempts - 1 or not _is_transient(err):
                raise
            log(WARNING, "[medfed] could not %s (%s); retrying", what, " ".join(str(err).split())[:200])
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _is_transient(err: Exception) -> bool:
    try:
        import httpx
    except ImportError:  # pragma: no cover - flwr depends on httpx
        return False
    if isinstance(err, httpx.HTTPStatusError):
        return err.response.status_code >= 500
    return isinstance(err, httpx.TransportError)


def replying_node(reply: Message, addressees: Mapping[str, int] | None) -> int:
    """The node a reply answers for: the addressee of the message it replies to, if known."""
    if addressees:
        node_id = addressees.get(reply.metadata.reply_to_message_id)
        if node_id is not None:
            return node_id
    return reply.metadata.src_node_id


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _sort_key(reply: Message) -> tuple:
    # Successful replies first, by site name then node id; errors last, by node id.
    return (reply.has_error(), _natural_key(site_name(reply)), reply.metadata.src_node_id)


class RoundRecorder:
    """Per-round bookkeeping and the ``"site"``/``"round"`` lines of ``metrics.jsonl``.

    Parameters
    ----------
    log : MetricsLog
        The run's metrics log.
    """

    def __init__(self, log: MetricsLog, task: str | None = None) -> None:
        self.log = log
        #: The dataset's task: pooled-test metrics are computed when it is set.
        self.task = task
        self.server_round = 0
        self.history: list[dict[str, Any]] = []
        #: Node id -> site name, learnt from replies and from the SuperLink's node list.
        self.node_names: dict[int, str] = {}
        self._reset()

    def _reset(self) -> None:
        self._started = time.perf_counter()
        self._bytes_sent = 0
        self._bytes_received = 0
        self._aggregates: dict[str, dict[str, float]] = {}
        #: What did not happen this round, and why: "model_kept", "evaluation_skipped".
        self._notes: dict[str, str] = {}

    def model_kept(self, reason: str) -> None:
        """The round keeps the global model though valid replies came (the strategy says why)."""
        self._notes["model_kept"] = reason

    def evaluation_skipped(self, reason: str) -> None:
        """The round's evaluation did not take place (too few sites connected)."""
        self._notes["evaluation_skipped"] = reason

    def round_started(self, server_round: int) -> None:
        """Start the clock and the counters of ``server_round`` (true round number)."""
        if server_round != self.server_round:
            self.server_round = server_round
            self._reset()

    def aggregated(self, phase: str, metrics: MetricRecord | None) -> None:
        """Keep the strategy's aggregate of ``phase`` ("train" or "evaluate") for the round line."""
        if metrics is not None:
            # Lists (the averaged confusion matrix) and counts are not round-level metrics.
            aggregate = {
                k: float(v) for k, v in metrics.items()
                if k not in _NOT_METRICS and not isinstance(v, list) and not k.startswith(GROUP_COUNT_PREFIX)
            }
            # The strategy's own ES (group-count weighted, MedfedStrategy) wins over ours.
            self._aggregates[phase] = {**_equity_scaled(aggregate), **aggregate}

    def record_exchange(
        self, phase: str, sent: Mapping[int, int], replies: list[Message], addressees: Mapping[str, int] | None = None
    ) -> None:
        """Write one ``"site"`` line per reply and add the bytes to the round's counters.

        ``addressees`` maps sent message ids to their destination nodes: an error reply
        that the SuperLink makes for an unreachable node carries the SuperLink as its
        source, and is attributed to the node the message was for.
        """
        self._bytes_sent += sum(sent.values())
        # Evaluation replies the strategy refuses to average (find_invalid_evaluate_replies,
        # e.g. no examples, or group counts above them) enter neither the site lines nor the pool.
        answered = [r for r in replies if not r.has_error() and r.content.metric_records]
        refused: dict[int, str] = {}
        if phase == "evaluate":
            invalid = find_invalid_evaluate_replies([r.content for r in answered])
            refused = {id(answered[index]): why for index, why in invalid.items()}
        for reply in replies:
            node_id = replying_node(reply, addressees)
            if reply.has_error():
                reason = error_text(reply.error.reason)
                log(WARNING, "Round %d %s: node %d replied with an error: %s", self.server_round, phase, node_id, reason)
                self.record_dropout(phase, node_id, f"error reply: {reason}")
                continue
            self.node_names[node_id] = site_name(reply)
            received = payload_bytes(reply.content)
            self._bytes_received += received
            if id(reply) in refused:
                self.record_dropout(phase, node_id, f"reply rejected: {refused[id(reply)]}")
                continue
            self.log.write(self._site_record(phase, reply, sent.get(node_id, 0), received))
        if phase == "evaluate":
            answered = [r for r in answered if id(r) not in refused]
            federation = [r for r in answered if not _held_out(r)]
            held_out = [r for r in answered if _held_out(r)]
            if self.task is not None and federation:  # pooled-test figures need the task's layout
                pooled = pooled_round_metrics(self.task, [_metrics(r) for r in federation])
                if pooled:
                    self._aggregates["evaluate_pooled"] = pooled
            if held_out:
                self._aggregates["held_out"] = _weighted_mean([_metrics(r) for r in held_out])

    def record_dropout(self, phase: str, node_id: int, reason: str) -> None:
        """Write a ``"dropout"`` line: the node's site took no part in this phase of the round."""
        site = self.node_names.get(node_id, f"node-{node_id}")
        log(WARNING, "Round %d %s: site %s dropped out: %s", self.server_round, phase, site, reason)
        self.log.write({"event": "dropout", "round": self.server_round, "phase": phase, "site": site,
                        "reason": reason})

    def _site_record(self, phase: str, reply: Message, sent: int, received: int) -> dict[str, Any]:
        content = reply.content
        metrics = dict(next(iter(content.metric_records.values()), {}))
        scalars = {k: v for k, v in metrics.items() if k not in _NOT_METRICS and not isinstance(v, list)}
        scalars.update(_equity_scaled(scalars))
        record: dict[str, Any] = {
            "event": "site", "round": self.server_round, "phase": phase, "site": site_name(reply),
            "num_examples": int(metrics.get("num-examples", 0)),
            "metrics": scalars,
            "bytes_sent": sent, "bytes_received": received,
        }
        if _held_out(reply):
            record["held_out"] = True
        if isinstance(metrics.get("confusion"), list) and metrics.get("num-classes"):
            record["confusion"] = _matrix(metrics["confusion"], int(metrics["num-classes"]), _multi_label(self.task))
        if "site" in content.config_records and "time-s" in content.config_records["site"]:
            record["time_s"] = float(content.config_records["site"]["time-s"])
        return record

    def round_finished(self, num_rounds: int) -> dict[str, Any]:
        """Write and return the round line of the current round."""
        record = {
            "event": "round", "round": self.server_round, "time": datetime.now(timezone.utc).isoformat(),
            "wall_time_s": time.perf_counter() - self._started,
            "bytes_sent": self._bytes_sent, "bytes_received": self._bytes_received,
            **{phase: self._aggregates.get(phase, {}) for phase in ("train", "evaluate")},
            **{phase: self._aggregates[phase] for phase in ("evaluate_pooled", "held_out") if phase in self._aggregates},
        }
        record.update(self._notes)
        self.log.write(record)
        self.history.append(record)
        train, evaluate = record["train"], record["evaluate"]
        log(INFO, "[medfed] round %d/%d  train loss %s  test acc %s auc %s  (%.1f s, %.2f MB)",
            self.server_round, num_rounds, _fmt(train.get("loss")), _fmt(evaluate.get("acc")),
            _fmt(evaluate.get("auc")), record["wall_time_s"], (self._bytes_sent + self._bytes_received) / 1e6)
        for what, reason in self._notes.items():
            log(WARNING, "[medfed] round %d: %s: %s", self.server_round, what.replace("_", " "), reason)
        return record


def _held_out(reply: Message) -> bool:
    site = reply.content.config_records.get("site") if not reply.has_error() else None
    return bool(site is not None and site.get("held-out", False))


def _metrics(reply: Message) -> dict[str, Any]:
    return dict(next(iter(reply.content.metric_records.values()), {}))


def _weighted_mean(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """The held-out sites' scalar metrics (not counts or lists) as the strategies aggregate
    the training sites': sample-weighted (:func:`~medfed.strategies._aggregation.sites_mean`),
    per-group metrics weighted by the group's counts, with their ES versions."""
    from medfed.strategies._aggregation import sites_mean
    from medfed.strategies._groups import equity_scaled_metrics

    weights = [float(m.get("num-examples", 0)) for m in metrics]
    keys = [k for k, v in metrics[0].items()
            if k not in _NOT_METRICS and not isinstance(v, list) and not k.startswith(GROUP_COUNT_PREFIX)]
    out = {k: sites_mean(k, [float(m.get(k, float("nan"))) for m in metrics], weights) for k in keys}
    out.update(equity_scaled_metrics(out, metrics))
    out["num_examples"] = int(sum(weights))
    return out


def _equity_scaled(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``es-acc``/``es-auc`` from ``acc``/``auc`` and the ``*-group-<g>`` values (none without groups)."""
    from medfed.data import equity_scaled

    out = {}
    for name in ("acc", "auc"):
        per_group = [float(v) for k, v in metrics.items() if (m := _GROUP.match(k)) and m.group(1) == name]
        if per_group and isinstance(metrics.get(name), (int, float)):
            out[f"es-{name}"] = equity_scaled(float(metrics[name]), per_group)
    return out


def pooled_round_metrics(task: str, replies: list[Mapping[str, Any]]) -> dict[str, float]:
    """Pooled-test metrics of one round from the sites' evaluate MetricRecords.

    Sums the sites' ``confusion`` and ``score-hist`` (and the per-group
    ``confusion-group-<g>`` / ``score-hist-group-<g>``) and computes ACC, balanced ACC,
    AUC (see :func:`medfed.data.pooled.pooled_metrics`), per-group ACC/AUC and ES-ACC /
    ES-AUC. Returns {} when the replies carry no confusion or histograms.
    """
    import numpy as np

    from medfed.data.pooled import SCORE_BINS, pooled_metrics

    def summed(key: str) -> np.ndarray | None:
        arrays = [np.asarray(m[key], dtype=np.int64) for m in replies if isinstance(m.get(key), list)]
        if len(arrays) != len(replies) or len({a.shape for a in arrays}) != 1:
            return None
        return np.sum(arrays, axis=0)

    def reshaped(flat_confusion: np.ndarray, flat_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if _multi_label(task):
            matrix = flat_confusion.reshape(-1, 2, 2)
        else:
            classes = int(replies[0].get("num-classes", 0))
            matrix = flat_confusion.reshape(classes, classes)
        return matrix, flat_hist.reshape(-1, 2, SCORE_BINS)

    def examples(key: str) -> int | None:
        counts = [m.get(key) for m in replies]
        return int(sum(counts)) if all(isinstance(c, (int, float)) for c in counts) else None

    confusion, hist = summed("confusion"), summed("score-hist")
    if confusion is None or hist is None:
        return {}
    out = pooled_metrics(task, *reshaped(confusion, hist), num_examples=examples("num-examples"))
    group = 0
    while (g_conf := summed(f"confusion-group-{group}")) is not None and (g_hist := summed(f"score-hist-group-{group}")) is not None:
        g_metrics = pooled_metrics(task, *reshaped(g_conf, g_hist), num_examples=examples(f"num-examples-group-{group}"))
        out[f"acc_group_{group}"] = g_metrics["acc"]
        out[f"auc_group_{group}"] = g_metrics["auc"]
        out[f"n_group_{group}"] = g_metrics["num_examples"]
        group += 1
    if group:
        from medfed.data import equity_scaled

        for name in ("acc", "auc"):
            out[f"es_{name}"] = equity_scaled(out[name], [out[f"{name}_group_{g}"] for g in range(group)
                                                         if out[f"n_group_{g}"] > 0])
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _multi_label(task: str | None) -> bool | None:
    """Whether ``task`` is multi-label (None: unknown)."""
    if task is None:
        return None
    from medfed.data.info import MULTI_LABEL, normalize_task

    return normalize_task(task) == MULTI_LABEL


def _matrix(flat: list[int], num_classes: int, multi_label: bool | None = None) -> list:
    """``[C, C]`` (or ``[L, 2, 2]`` for multi-label) nested lists from a flat confusion.

    With the task unknown (``multi_label`` None) the length decides, which cannot tell
    4 labels (``[4, 2, 2]``) from 4 classes (``[4, 4]``)."""
    if multi_label is None:
        multi_label = len(flat) != num_classes * num_classes
    if not multi_label and len(flat) == num_classes * num_classes:
        return [flat[i * num_classes:(i + 1) * num_classes] for i in range(num_classes)]
    if multi_label and len(flat) == 4 * num_classes:
        return [[flat[4 * i:4 * i + 2], flat[4 * i + 2:4 * i + 4]] for i in range(num_classes)]
    return flat


_FLOWER_EXCEPTION = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", re.DOTALL)


def error_text(reason: str) -> str:
    """A site's error as people read it: Flower's ``<class 'pkg.SiteFailure'>:<'text'>`` -> ``SiteFailure: text``."""
    match = _FLOWER_EXCEPTION.fullmatch(reason.strip())
    return site_text(f"{match.group(1)}: {match.group(2)}" if match else reason, 500)


class RecordingGrid(DelegatingGrid):
    """A Grid that delegates to another and records every ``send_and_receive``.

    Only ``send_and_receive`` is recorded (what ``Strategy.start`` uses); ``push_messages``
    and ``pull_messages`` pass through unrecorded.

    Parameters
    ----------
    grid : Grid
        The ServerApp's Grid (in-memory in simulation, HTTP in deployment).
    recorder : RoundRecorder
        Receives the byte counts and the replies.
    """

    def __init__(self, grid: Grid, recorder: RoundRecorder, *, poll_interval_s: float | None = None) -> None:
        super().__init__(grid)
        self.recorder = recorder
        self.poll_interval_s = poll_interval_s

    def get_node_ids(self) -> Iterable[int]:
        # Sorted: strategies sample from this list, so its order must not vary.
        return sorted(self._grid.get_node_ids())

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        phase = messages[0].metadata.message_type.split(".")[0]
        sent: dict[int, int] = {}
        for message in messages:
            node_id = message.metadata.dst_node_id
            sent[node_id] = sent.get(node_id, 0) + payload_bytes(message.content)
        self._learn_node_names()
        if self.poll_interval_s is None:
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        else:
            replies = self._push_and_poll(messages, timeout)
        replies = sorted(replies, key=_sort_key)
        addressees = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}
        self.recorder.record_exchange(phase, sent, replies, addressees)
        answered = {replying_node(reply, addressees) for reply in replies}
        for node_id in sent:
            if node_id not in answered:
                self.recorder.record_dropout(phase, node_id, f"no reply within {timeout:g} s" if timeout else "no reply")
        return replies

    def _push_and_poll(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Flower's ``send_and_receive``, polling every ``poll_interval_s`` instead of every 3 s."""
        pending = set(_retry_transient(lambda: list(self._grid.push_messages(messages)), "push the messages"))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = _retry_transient(lambda: list(self._grid.pull_messages(pending)), "pull the replies")
            replies.extend(pulled)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval_s)
        return replies

    def _learn_node_names(self) -> None:
        # Deployed sites are registered at the SuperLink under their site names.
        try:
            nodes = list(self._grid.get_nodes())
        except Exception:  # noqa: BLE001 - a name is a nicety; the simulation's grid may lack it
            return
        for node in nodes:
            name = getattr(node, "name", "")
            if name and node.node_id not in self.recorder.node_names:
                self.recorder.node_names[node.node_id] = name
