"""Held-out sites: found once per run, left out of training, evaluated every round.

A held-out site (an unseen hospital) never trains. Flower's strategies sample training
nodes from ``grid.get_node_ids()``, and node ids say nothing about a node's role, so
before the first round the server asks every node who it is: one ``query`` message
(MessageType.QUERY) that medfed's ClientApp answers with its name and ``held-out``
flag, read from its node config and the experiment without loading images. The
training phase then sees the grid through :class:`WithoutNodes`, which hides the
held-out nodes from sampling; the evaluation phase sees every node, and the server
records the held-out sites' results apart (see :mod:`medfed.server.recording`).
The query runs only when the experiment has held-out sites.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

__all__ = ["WithoutNodes", "discover_held_out_nodes"]


def discover_held_out_nodes(grid: Grid, expected_nodes: int, *, timeout_s: float = 600.0) -> dict[int, str]:
    """Ask every node whether it is held out; return ``{node id: site name}`` of those that are.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    expected_nodes : int
        Training plus held-out sites: wait (up to ``timeout_s``) until that many are connected.
    timeout_s : float
        Longest wait for nodes and for their answers, in seconds.
    """
    deadline = time.monotonic() + timeout_s
    while len(node_ids := sorted(grid.get_node_ids())) < expected_nodes and time.monotonic() < deadline:
        log(INFO, "Waiting for %d sites to connect (%d so far) to find the held-out ones.", expected_nodes, len(node_ids))
        time.sleep(1.0)
    messages = [
        Message(content=RecordDict({"config": ConfigRecord({"question": "site-role"})}),
                dst_node_id=node_id, message_type=MessageType.QUERY)
        for node_id in node_ids
    ]
    held_out: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())):
        if reply.has_error() or "site" not in reply.content.config_records:
            log(WARNING, "Node %s did not say whether it is held out; it may be sampled for training.",
                reply.metadata.src_node_id)
            continue
        site = reply.content.config_records["site"]
        if bool(site.get("held-out", False)):
            held_out[reply.metadata.src_node_id] = str(site.get("name", f"node-{reply.metadata.src_node_id}"))
    log(INFO, "Held-out sites (evaluate only, never train): %s", ", ".join(sorted(held_out.values())) or "none")
    return held_out


class WithoutNodes(Grid):
    """A view of a Grid that hides some nodes from ``get_node_ids`` (everything else delegates)."""

    def __init__(self, grid: Grid, hidden: Iterable[int]) -> None:
        self._grid = grid
        self.hidden = frozenset(hidden)

    def set_run(self, run) -> None:  # noqa: ANN001 - flwr's Run
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: ANN001
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [node_id for node_id in self._grid.get_node_ids() if node_id not in self.hidden]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
