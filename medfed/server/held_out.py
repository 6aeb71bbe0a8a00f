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

from medfed.server.recording import site_text

__all__ = ["NodeView", "SiteRole", "SiteRoster", "SiteWait", "ask_sites"]


#: Seconds between two lines that say which sites the server still waits for.
WAIT_REPORT_S = 30.0
#: Seconds between two pulls for replies where the Grid does not say (Flower's own
#: ``send_and_receive`` of a SuperLink's ServerApp sleeps 3 s; its in-memory Grid has
#: ``pull_interval``).
FLOWER_PULL_INTERVAL_S = 3.0


class SiteWait(NamedTuple):
    """Where a wait for the sites' answers stands."""

    answered: int
    asked: int
    #: The sites not heard from: their names where known, else "node <id>".
    missing: tuple[str, ...]
    #: Seconds the server still waits for them.
    remaining_s: float

    def describe(self, check_data: bool) -> str:
        question = "the check of their data" if check_data else "who they are"
        return (f"{self.answered} of {self.asked} site(s) have answered {question}; waiting for "
                f"{', '.join(self.missing)} (at most {self.remaining_s:.0f} s more, then the run goes on without "
                "their answer)")


class SiteRole(NamedTuple):
    """What a node said about itself."""

    name: str
    held_out: bool
    #: What keeps its data out of the study, in words that name no file; "" when it fits
    #: or was not asked.
    problem: str = ""


def _connected(grid: Grid, expected_nodes: int, deadline: float) -> list[int]:
    """The connected node ids, once ``expected_nodes`` are (or at ``deadline``)."""
    while len(node_ids := sorted(grid.get_node_ids())) < expected_nodes and time.monotonic() < deadline:
        log(INFO, "Waiting for %d sites to connect (%d so far) to find the held-out ones.", expected_nodes, len(node_ids))
        time.sleep(1.0)
    return node_ids


def _question(check_data: bool) -> RecordDict:
    return RecordDict({"config": ConfigRecord({"question": "site-check" if check_data else "site-role"})})


def ask_sites(grid: Grid, node_ids: Iterable[int], *, check_data: bool, timeout_s: float,
              names: Callable[[], Mapping[int, str]] | None = None,
              on_wait: Callable[[SiteWait], None] | None = None) -> dict[int, SiteRole]:
    """One ``query`` to each of ``node_ids``; ``{node id: SiteRole}`` of those that answered.

    Replies are read as Flower's ``Grid.send_and_receive`` reads them (pushed, then pulled
    until all have come or ``timeout_s`` has passed; a later reply is not read), but while
    some are missing a line says every :data:`WAIT_REPORT_S` seconds which sites the server
    still waits for (named by ``names()``, node id -> site name, where known) and for how
    long; ``on_wait`` receives the same as a :class:`SiteWait`. A site that loads a large
    dataset to check it may take minutes, and the server would otherwise say nothing.
    """
    messages = [Message(content=_question(check_data), dst_node_id=node_id, message_type=MessageType.QUERY)
                for node_id in node_ids]
    sites: dict[int, SiteRole] = {}
    replies = _push_and_pull(grid, messages, timeout_s, check_data=check_data, names=names,
                             on_wait=on_wait) if messages else ()
    for reply in replies:
        role = _role(reply)
        if role is None:
            log(WARNING, "Node %s did not say who it is; it may be sampled for training, and is sampled last.",
                reply.metadata.src_node_id)
            continue
        sites[reply.metadata.src_node_id] = role
    return sites


def _push_and_pull(grid: Grid, messages: list[Message], timeout_s: float, *, check_data: bool,
                   names: Callable[[], Mapping[int, str]] | None,
                   on_wait: Callable[[SiteWait], None] | None) -> list[Message]:
    """Flower's ``send_and_receive`` (same pulls, same timeout), saying whom it waits for."""
    pushed = list(grid.push_messages(messages))
    pending = {message_id: node_id for message_id, node_id in _addressees(pushed, messages).items() if message_id}
    poll_s = float(getattr(grid, "pull_interval", FLOWER_PULL_INTERVAL_S))
    start = time.monotonic()
    deadline, report_due = start + timeout_s, start + WAIT_REPORT_S
    replies: list[Message] = []
    while pending and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(list(pending)))
        replies.extend(pulled)
        for reply in pulled:
            pending.pop(reply.metadata.reply_to_message_id, None)
        if not pending:
            break
        now = time.monotonic()
        if now >= report_due:
            report_due = now + WAIT_REPORT_S
            known = names() if names is not None else {}
            missing = sorted(pending.values(), key=lambda node_id: (node_id is None, node_id or 0))
            # Out of the questions that went out: one Flower could not push is not answered.
            sent = sum(1 for message_id in pushed if message_id)
            wait = SiteWait(sent - len(pending), sent,
                            tuple(known.get(node_id) or ("a site" if node_id is None else f"node {node_id}")
                                  for node_id in missing),
                            max(0.0, deadline - now))
            log(INFO, "%s", wait.describe(check_data))
            if on_wait is not None:
                on_wait(wait)
        time.sleep(poll_s)
    return replies


def _addressees(pushed: list[str | None], messages: list[Message]) -> dict[str | None, int | None]:
    """Message id -> the node it went to (None where unknown).

    Flower's Grids give a pushed message its id (``metadata.message_id``) and return the
    ids in the order of the messages, with None (HTTP) or nothing (in-memory) for one they
    could not push.
    """
    by_id = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}
    in_order = len(pushed) == len(messages)
    return {message_id: by_id.get(message_id, messages[position].metadata.dst_node_id if in_order else None)
            for position, message_id in enumerate(pushed)}


def _role(reply: Message) -> SiteRole | None:
    if reply.has_error() or "site" not in reply.content.config_records:
        return None
    site = reply.content.config_records["site"]
    return SiteRole(site_text(str(site.get("name", f"node-{reply.metadata.src_node_id}")), 100),
                    bool(site.get("held-out", False)), site_text(str(site.get("problem", ""))))


class SiteRoster:
    """Who each node is, and which nodes a deployed run leaves out because their data does
    not fit the study.

    A site's data folder is checked by ``medfed client`` before it connects, but only for
    what the site alone can know; labels outside the study's classes, images of another
    size or channel count need the run's config. A deployed server therefore asks every
    site to check its data against the study (``check_data``): all of them before the
    first round (:meth:`discover`), and before each phase of a round those that joined
    since (:meth:`refresh`), so that none is sampled unchecked. A site left out is
    neither trained nor evaluated; it is asked again (a site may fix its data) without
    holding up the others: the question goes out before one round and its answer is
    read before a later one.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid (unwrapped: these questions are not part of a round's record).
    check_data : bool
        Ask about the data too, and keep asking (deployment).
    timeout_s : float
        Longest wait for the answers of a new site, in seconds.
    on_answer : callable, optional
        Called with ``(node_id, role)`` for every answer.
    registered : callable, optional
        Returns node id -> the site name its key is registered under (``medfed server``
        with TLS), or None. A node that answers under another name is left out: a site's
        name is otherwise only what it says.
    on_wait : callable, optional
        Called with a :class:`SiteWait` every :data:`WAIT_REPORT_S` seconds while answers
        are missing (a line in the ServerApp's log says the same).
    """

    def __init__(self, grid: Grid, *, check_data: bool = False, timeout_s: float = 600.0,
                 on_answer: Callable[[int, SiteRole], None] | None = None,
                 registered: Callable[[], Mapping[int, str] | None] | None = None,
                 on_wait: Callable[[SiteWait], None] | None = None) -> None:
        self.grid = grid
        self.registered = registered
        self.on_wait = on_wait
        self.check_data = check_data
        self.timeout_s = timeout_s
        self.on_answer = on_answer
        self.roles: dict[int, SiteRole] = {}
        self._silent: set[int] = set()  # asked, never answered: sampled like any site, not asked again
        self._pending: dict[str, int] = {}  # message id of a question to a left-out site -> its node

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

    def discover(self, expected_nodes: int, timeout_s: float) -> None:
        """Ask every connected node (after waiting up to ``timeout_s`` for ``expected_nodes``)."""
        deadline = time.monotonic() + timeout_s
        node_ids = _connected(self.grid, expected_nodes, deadline)
        self._ask(node_ids, max(1.0, deadline - time.monotonic()))
        held_out = sorted(role.name for role in self.roles.values() if role.held_out)
        if held_out:
            log(INFO, "Held-out sites (evaluate only, never train): %s", ", ".join(held_out))

    def refresh(self) -> None:
        """Read the answers of left-out sites asked before; ask new nodes now; ask left-out sites again."""
        if not self.check_data:
            return
        for reply in self.grid.pull_messages(list(self._pending)) if self._pending else ():
            node_id = self._pending.pop(reply.metadata.reply_to_message_id, None)
            if node_id is not None and (role := _role(reply)) is not None:
                self._heard(node_id, role)
        connected = sorted(self.grid.get_node_ids())
        new = [node_id for node_id in connected if node_id not in self.roles and node_id not in self._silent]
        if new:
            self._ask(new, self.timeout_s)
        asking = set(self._pending.values())
        again = [node_id for node_id in connected if node_id in self.left_out and node_id not in asking]
        if again:
            messages = [Message(content=_question(True), dst_node_id=node_id, message_type=MessageType.QUERY)
                        for node_id in again]
            self._pending.update(zip(self.grid.push_messages(messages), again))

    def _answers_as(self, name: str, *, other_than: int) -> bool:
        """Whether another connected node that is not left out has answered as ``name``."""
        others = [n for n, r in self.roles.items() if n != other_than and r.name == name and not r.problem]
        return bool(others) and bool(set(others) & set(self.grid.get_node_ids()))

    def _ask(self, node_ids: list[int], timeout_s: float) -> None:
        answers = ask_sites(self.grid, node_ids, check_data=self.check_data, timeout_s=timeout_s,
                            names=self._known_names, on_wait=self.on_wait)
        self._silent.update(node_id for node_id in node_ids if node_id not in answers)
        for node_id, role in answers.items():
            self._heard(node_id, role)

    def _known_names(self) -> dict[int, str]:
        """Node id -> site name, for saying whom the server waits for: the name a node's key
        is registered under (deployment with TLS), else the name it answered with before."""
        registered = self.registered() if self.registered is not None else None
        return {**self.names, **(registered or {})}

    def _heard(self, node_id: int, role: SiteRole) -> None:
        registered = self.registered() if self.registered is not None else None
        if not role.problem and registered is not None and node_id not in registered:
            # A key registered by a stranger through the Control API lives up to a second;
            # the study's own nodes are all in the file before round 1. Asked again later.
            role = role._replace(problem="its key is not one of the study's registered sites")
        elif not role.problem and registered is not None and registered[node_id] != role.name:
            role = role._replace(problem=f"it answers as {role.name!r} but its key is registered as "
                                         f"{registered[node_id]!r}")
        elif not role.problem and self._answers_as(role.name, other_than=node_id):
            # Two nodes under one name would share one row of the results, the later
            # overwriting the earlier: the first keeps the name, this one is left out.
            role = role._replace(problem=f"another connected site already answers as {role.name!r}; each site "
                                         "needs its own name and key")
        self.roles[node_id] = role
        self._silent.discard(node_id)
        if self.on_answer is not None:
            self.on_answer(node_id, role)


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
