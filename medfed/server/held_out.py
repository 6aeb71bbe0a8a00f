"""Who each node is: held-out sites, a fixed sampling order, sites whose data does not fit.

Node ids say nothing about a node's role or name, and Ray gives new ones in every run.
Before the first round the server therefore asks every node who it is: one ``query``
message (MessageType.QUERY) that medfed's ClientApp answers with its name and
``held-out`` flag, read from its node config and the experiment without loading images.
It is asked when the answer matters:

* A deployed site's data is checked against the study (:class:`SiteRoster`): the site
  loads it and says what does not fit, and the server leaves it out of the run instead
  of seeing it fail in every round.

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
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

__all__ = ["NodeView", "SiteRole", "SiteRoster", "ask_sites", "discover_sites"]


class SiteRole(NamedTuple):
    """What a node said about itself."""

    name: str
    held_out: bool
    #: What keeps its data out of the study, in words that name no file; "" when it fits
    #: or was not asked.
    problem: str = ""


def discover_sites(grid: Grid, expected_nodes: int, *, check_data: bool = False,
                   timeout_s: float = 600.0) -> dict[int, SiteRole]:
    """Ask every node who it is; return ``{node id: SiteRole}`` of those that answered.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    expected_nodes : int
        Training plus held-out sites: wait (up to ``timeout_s``) until that many are
        connected. 0: ask those connected now.
    check_data : bool
        Ask each site also to load its data and say whether it fits the study.
    timeout_s : float
        Longest wait for nodes and for their answers, in seconds.
    """
    deadline = time.monotonic() + timeout_s
    while len(node_ids := sorted(grid.get_node_ids())) < expected_nodes and time.monotonic() < deadline:
        log(INFO, "Waiting for %d sites to connect (%d so far) to find the held-out ones.", expected_nodes, len(node_ids))
        time.sleep(1.0)
    sites = ask_sites(grid, node_ids, check_data=check_data, timeout_s=max(1.0, deadline - time.monotonic()))
    held_out = sorted(role.name for role in sites.values() if role.held_out)
    log(INFO, "Held-out sites (evaluate only, never train): %s", ", ".join(held_out) or "none")
    return sites


def ask_sites(grid: Grid, node_ids: Iterable[int], *, check_data: bool, timeout_s: float) -> dict[int, SiteRole]:
    """One ``query`` to each of ``node_ids``; ``{node id: SiteRole}`` of those that answered."""
    question = "site-check" if check_data else "site-role"
    messages = [
        Message(content=RecordDict({"config": ConfigRecord({"question": question})}),
                dst_node_id=node_id, message_type=MessageType.QUERY)
        for node_id in node_ids
    ]
    sites: dict[int, SiteRole] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s) if messages else ():
        node_id = reply.metadata.src_node_id
        if reply.has_error() or "site" not in reply.content.config_records:
            log(WARNING, "Node %s did not say who it is; it may be sampled for training, and is sampled last.",
                node_id)
            continue
        site = reply.content.config_records["site"]
        sites[node_id] = SiteRole(str(site.get("name", f"node-{node_id}")), bool(site.get("held-out", False)),
                                  str(site.get("problem", "")))
    return sites


class SiteRoster:
    """Who each node is, and which nodes a deployed run leaves out because their data does
    not fit the study.

    A site's data folder is checked by ``medfed client`` before it connects, but only for
    what the site alone can know; labels outside the study's classes, images of another
    size or channel count need the run's config. A deployed server therefore asks every
    site to check its data against the study (``check_data``): before the first round,
    and before each later round for the nodes it has not heard from (sites that joined
    late) and those it left out (a site may fix its data and restart its client). A site
    left out is neither trained nor evaluated, and said once, not every round.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid (unwrapped: these questions are not part of a round's record).
    roles : mapping of int to SiteRole
        What the nodes said at the start (:func:`discover_sites`).
    check_data : bool
        Ask again before each round (deployment).
    timeout_s : float
        Longest wait for the answers, in seconds.
    on_change : callable, optional
        Called with ``(node_id, role)`` for each node newly left out or let back in.
    """

    def __init__(self, grid: Grid, roles: Mapping[int, SiteRole] | None = None, *, check_data: bool = False,
                 timeout_s: float = 600.0, on_change: Callable[[int, SiteRole], None] | None = None) -> None:
        self.grid = grid
        self.roles = dict(roles or {})
        self.check_data = check_data
        self.timeout_s = timeout_s
        self.on_change = on_change
        self._just_asked = set(self.roles)  # the first refresh need not ask them again
        for node_id, role in self.roles.items():
            if role.problem and on_change is not None:
                on_change(node_id, role)

    @property
    def held_out_nodes(self) -> frozenset[int]:
        return frozenset(node_id for node_id, role in self.roles.items() if role.held_out and not role.problem)

    @property
    def left_out(self) -> dict[int, SiteRole]:
        """Nodes whose data does not fit the study."""
        return {node_id: role for node_id, role in self.roles.items() if role.problem}

    @property
    def names(self) -> dict[int, str]:
        return {node_id: role.name for node_id, role in self.roles.items()}

    def refresh(self) -> None:
        """Ask the nodes not heard from yet, and those left out, whether their data fits now."""
        if not self.check_data:
            return
        asked = [node_id for node_id in sorted(self.grid.get_node_ids()) if node_id not in self.roles
                 or (self.roles[node_id].problem and node_id not in self._just_asked)]
        self._just_asked = set()
        if not asked:
            return
        answers = ask_sites(self.grid, asked, check_data=True, timeout_s=self.timeout_s)
        for node_id in asked:
            before = self.roles.get(node_id)
            # A node that did not answer is sampled as any other, and not asked again.
            role = answers.get(node_id, before or SiteRole(f"node-{node_id}", False))
            self.roles[node_id] = role
            if self.on_change is not None and role.problem != (before.problem if before else ""):
                self.on_change(node_id, role)


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
