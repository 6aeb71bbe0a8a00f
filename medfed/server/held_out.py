"""Who each node is, asked once per run: held-out sites and a fixed sampling order.

Node ids say nothing about a node's role or name, and Ray gives new ones in every run.
Before the first round the server therefore asks every node who it is: one ``query``
message (MessageType.QUERY) that medfed's ClientApp answers with its name and
``held-out`` flag, read from its node config and the experiment without loading images.
It is asked when the answer matters:

* Held-out sites (unseen hospitals) never train: the training phase sees the grid
  through :class:`NodeView`, which hides them; every round they are evaluated as well
  as the sampled training sites, and the server records their results apart (see
  :mod:`medfed.server.recording`).
* When a round samples a fraction of the sites, Flower's strategies draw from
  ``grid.get_node_ids()`` with Python's ``random``: :class:`NodeView` lists the nodes by
  site name, and :class:`~medfed.server.resume.RoundOffsetStrategy` seeds the draw from
  the experiment's seed and the round, so that the same sites are drawn on both engines
  and in every run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

__all__ = ["NodeView", "SiteRole", "discover_sites"]


class SiteRole(NamedTuple):
    """What a node said about itself."""

    name: str
    held_out: bool


def discover_sites(grid: Grid, expected_nodes: int, *, timeout_s: float = 600.0) -> dict[int, SiteRole]:
    """Ask every node who it is; return ``{node id: SiteRole}`` of those that answered.

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
    sites: dict[int, SiteRole] = {}
    for reply in grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())):
        node_id = reply.metadata.src_node_id
        if reply.has_error() or "site" not in reply.content.config_records:
            log(WARNING, "Node %s did not say who it is; it may be sampled for training, and is sampled last.",
                node_id)
            continue
        site = reply.content.config_records["site"]
        sites[node_id] = SiteRole(str(site.get("name", f"node-{node_id}")), bool(site.get("held-out", False)))
    held_out = sorted(role.name for role in sites.values() if role.held_out)
    log(INFO, "Held-out sites (evaluate only, never train): %s", ", ".join(held_out) or "none")
    return sites


class NodeView(Grid):
    """A view of a Grid whose ``get_node_ids`` hides some nodes and lists the others by site
    name (nodes of unknown name last, by id); everything else delegates."""

    def __init__(self, grid: Grid, hidden: Iterable[int] = (), names: Mapping[int, str] | None = None) -> None:
        self._grid = grid
        self.hidden = frozenset(hidden)
        self.names = dict(names or {})

    def set_run(self, run) -> None:  # noqa: ANN001 - flwr's Run
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: ANN001
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        shown = [node_id for node_id in self._grid.get_node_ids() if node_id not in self.hidden]
        return sorted(shown, key=lambda node_id: (node_id not in self.names, self.names.get(node_id, ""), node_id))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
