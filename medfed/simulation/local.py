"""The in-process simulation engine (``simulation.engine: inprocess``, or ``auto`` on one
GPU or when at most one site fits the cores): sites run one after the other in the
launching process, without Ray.

:class:`LocalGrid` is a Flower ``Grid`` that delivers each message straight to a
ClientApp in the same process, one site after the other, with the node config Flower's
simulation engine would give that site (``partition-id``, ``num-partitions``) and the
same run config. The ServerApp and ClientApp are medfed's own, unchanged, so an
in-process run gives the same metrics and weights as the Ray engine on the same CPU
(the ClientApp fixes its thread count to ``simulation.cpus_per_site``; tested in
``tests/simulation/test_end_to_end.py``).

When to use which engine
------------------------
* ``inprocess``: no start-up cost (Ray's start-up and every actor's
  imports took 13-18 s on the 2-core reference machine, see ``docs/performance.md``),
  one copy of the model and data in memory, and on one GPU every site gets the whole
  device in turn (set ``simulation.gpus_per_site`` > 0 to let sites use it). Sites
  use ``cpus_per_site`` torch threads each, one site at a time.
* ``ray``: sites in parallel on ``floor(cores / cpus_per_site)`` actors, fractional
  GPUs (``gpus_per_site: 0.25``), process isolation and clusters (``ray_address``):
  for many cores or many GPUs, and for long runs where parallel sites repay the
  start-up.
* ``auto`` (the default) picks one per machine:
  :func:`medfed.simulation.run.resolve_engine`.

The in-process engine has no resource limits and no process isolation: a site that
crashes the interpreter (a segfault, running out of memory) ends the run, which then
continues with ``--resume``.
"""

from __future__ import annotations

import shutil

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from medfed.config import ExperimentConfig, to_run_config

__all__ = ["LocalGrid", "run_local"]

_SERVER_NODE_ID = 1


def _ensure_task_identity() -> None:
    """Give this process a task identity: Flower 1.42 stamps every new Message with it."""
    if TaskIdentity._run_id is None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, _SERVER_NODE_ID


class LocalGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    node_configs : list[dict]
        One node config per node; node ``i`` gets node id ``i + 2`` (ids 0 and 1 are
        Flower's reserved ids).
    run_config : dict
        The nodes' ``context.run_config``.
    """

    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_config: dict[str, Any]) -> None:
        self.client_app = client_app
        self.contexts = {
            index + 2: Context(run_id=0, node_id=index + 2, node_config=dict(config), state=RecordDict(),
                               run_config=dict(run_config))
            for index, config in enumerate(node_configs)
        }
        self._replies: dict[str, Message] = {}
        self._run = None
        _ensure_task_identity()

    def set_run(self, run) -> None:  # noqa: ANN001 - flwr's Run
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: ANN001
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = str(uuid.uuid4())
            # Set what a SuperLink would set on arrival.
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_src_node_id"] = _SERVER_NODE_ID
            self._replies[message_id] = self._deliver(message)
            ids.append(message_id)
        return ids

    def _deliver(self, message: Message) -> Message:
        context = self.contexts[message.metadata.dst_node_id]
        try:
            return self.client_app(message, context)
        except Exception as error:  # noqa: BLE001 - a site's failure becomes an error reply, as in Flower
            reason = f"{type(error).__name__}: {error}"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(message_id) for message_id in list(message_ids) if message_id in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_local(
    cfg: ExperimentConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    server_app: ServerApp | None = None,
    client_app: ClientApp | None = None,
) -> Path:
    """Run ``cfg`` with :class:`LocalGrid`: like :func:`medfed.simulation.simulate`, without Ray.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    run_dir : str or Path, optional
        Run directory; default ``{cfg.output_dir}/{cfg.name}``.
    resume : bool
        Continue the run in ``run_dir`` from its last complete round.
    server_app, client_app : optional
        Apps to run instead of medfed's own (tests).

    Returns
    -------
    Path
        The run directory.
    """
    from medfed.client.site_data import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
    from medfed.client.site_state import SITE_STATE_DIR_KEY
    from medfed.server.server_app import RESUME_KEY, RUN_DIR_KEY
    from medfed.simulation.run import SITE_STATE_FOLDER

    if server_app is None:
        from medfed.server.server_app import app as server_app
    if client_app is None:
        from medfed.client.client_app import app as client_app
    run_dir = (Path(run_dir) if run_dir is not None else Path(cfg.output_dir) / cfg.name).expanduser().resolve()
    from medfed.sites.profiles import num_nodes

    num_sites = num_nodes(cfg.federation)  # training sites plus held-out sites
    node_configs = [{PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_sites} for i in range(num_sites)]
    from medfed.sites.preview import preview_run_sites

    preview_run_sites(cfg, run_dir)
    client_run_config = {**to_run_config(cfg), SITE_STATE_DIR_KEY: str(run_dir / SITE_STATE_FOLDER)}
    if not resume:  # a fresh run must not find an older run's site state
        shutil.rmtree(run_dir / SITE_STATE_FOLDER, ignore_errors=True)
    grid = LocalGrid(client_app, node_configs, client_run_config)
    server_run_config = {**to_run_config(cfg), RUN_DIR_KEY: str(run_dir), RESUME_KEY: bool(resume)}
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=server_run_config)
    import torch

    threads = torch.get_num_threads()
    try:
        server_app(grid=grid, context=context)
    finally:
        torch.set_num_threads(threads)  # the ClientApp fixes its own thread count
    return run_dir
