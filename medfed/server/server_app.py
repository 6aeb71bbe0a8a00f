"""The ServerApp: build the run from the experiment config and let Flower run the rounds.

The experiment comes from ``context.run_config`` (:func:`medfed.config.from_run_config`),
the same in simulation and deployment, plus two server-only keys:

* ``run-dir`` (str, ``""`` -> ``{output_dir}/{name}``): where the run's files go;
* ``resume`` (bool): continue the run in ``run-dir`` from its last complete round.

``medfed server`` gives these two through the environment instead
(``MEDFED_RUN_DIR``, ``MEDFED_RESUME=1``): a deployed run config reaches every site, and a
server path is none of their business.

Sites may drop out: each phase of a round waits at most ``federation.round_timeout_s``,
and a round whose valid training replies fall below the quorum
(:mod:`medfed.server.quorum`) leaves the global model as it was and is retried from the
last checkpoint, up to ``federation.round_retries`` times in a row.

The rounds are Flower's own ``Strategy.start``. ``evaluate_fn``, which ``start`` calls
after every round's training and evaluation (and once before round 1), is the
end-of-round hook: it writes the ``"round"`` line of ``metrics.jsonl`` and then the
checkpoint (:mod:`medfed.server.checkpoint`), in that order, so a crash between the two
only repeats a round. The server never loads images: the model is built from the
dataset's metadata alone.
"""

from __future__ import annotations

import os
import random
import secrets
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from medfed.client.site_state import RUN_KEY
from medfed.models.pretrained import checkpoint_digest
from medfed.strategies.hooks import INIT_DIGEST_KEY
from medfed.config import ExperimentConfig, config_to_dict, from_run_config
from medfed.deploy.app_guard import check_run_config
from medfed.data import dataset_info
from medfed.server.checkpoint import save_arrays, save_checkpoint
from medfed.server.held_out import SiteRole, SiteRoster, SiteWait
from medfed.server.quorum import QuorumError, QuorumGuard, QuorumNotMet, apply_quorum, quorum_advice
from medfed.server.recording import RecordingGrid, RoundRecorder
from medfed.server.metrics_log import MetricsLog, read_metrics
from medfed.server.report import build_report, print_summary
from medfed.server.transfer import TransferGrid
from medfed.server.resume import (
    RUN_KEY_STATE, RoundOffsetStrategy, RunStart, check_checkpoint_fits, get_rng_state, prepare_run_dir, run_key_of,
    set_rng_state,
)
from medfed.server.run_files import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, read_registered_sites
from medfed.strategies import ModelSpec, ReplyPolicy, create_strategy, load_strategy_state, strategy_state
from medfed.strategies.base import MedfedStrategy
from medfed.transfer import numpy_arrays

__all__ = [
    "RESUME_ENV", "RESUME_KEY", "RUN_DIR_ENV", "RUN_DIR_KEY", "app", "build_strategy", "initial_model_arrays",
    "read_run_config",
]

RUN_DIR_KEY = "run-dir"
RESUME_KEY = "resume"
RUN_DIR_ENV = "MEDFED_RUN_DIR"
RESUME_ENV = "MEDFED_RESUME"
#: Seconds between two pulls for replies from a SuperLink (Flower's own loop sleeps 3 s; each
#: pull is a write to the SuperLink's SQLite state, so not much shorter);
#: ``MEDFED_REPLY_POLL_S`` overrides it (benchmarks/bench_deployment.py compares the two).
DEPLOYED_POLL_INTERVAL_S = 0.5
#: Longest wait, in seconds, for the sites to say who they are (and, deployed, to check
#: their data) before round 1; at most ``federation.round_timeout_s``. A deployed site
#: checks by loading all its images in a fresh ClientApp process: 224 px PNGs decode at
#: about 0.7 ms (grayscale) and 1.4 ms (RGB) each on one core with a warm cache, so a site
#: of 100,000 images takes 1-3 minutes and more from a cold disk; a MedMNIST+ 224 px .npz
#: of that size is 5-16 GB to decompress (about 150 MB/s). The server says every 30 s
#: whom it still waits for (:func:`medfed.server.held_out.ask_sites`).
SITE_CHECK_TIMEOUT_S = 600.0

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the experiment described by the run config."""
    check_run_config(context.run_config)  # deployed: only the run medfed server submitted, as it wrote it
    cfg, run_dir, resume = read_run_config(context.run_config)
    missed, missed_round = 0, None
    while True:
        try:
            _run(grid, cfg, run_dir, resume)
            return
        except QuorumNotMet as err:
            # Retries count per round: misses of rounds 3, 5 and 8 in a long study are not
            # three in a row.
            missed = missed + 1 if err.server_round == missed_round else 1
            missed_round = err.server_round
            MetricsLog(run_dir / METRICS_FILE).write({
                "event": "quorum_missed", "time": _now(), "round": err.server_round, "sites": err.sites,
                "needed": err.needed, "stage": err.stage, "attempt": missed,
            })
            if missed > cfg.federation.round_retries:
                raise QuorumError(
                    f"Round {err.server_round} had {err.sites} site(s) {err.stage} but the quorum "
                    f"(federation.min_sites) is {err.needed}, {missed} time(s) in a row; the run stopped after "
                    f"round {err.server_round - 1}. "
                    + quorum_advice(read_metrics(run_dir / METRICS_FILE), err.server_round,
                                    f"Bring the sites back and resume the run in {run_dir}.")
                ) from None
            resume = True  # retry the round from the last checkpoint


def _run(grid: Grid, cfg: ExperimentConfig, run_dir: Path, resume: bool) -> None:
    start = prepare_run_dir(cfg, run_dir, resume)
    log = MetricsLog(run_dir / METRICS_FILE)  # first: it repairs a half-written last line (and says so once)
    run_key = _run_key(run_dir, start)
    recorder = RoundRecorder(log, task=dataset_info(cfg.data.dataset).task)
    recorder.history = start.history
    strategy = build_strategy(cfg)
    reference = initial_model_arrays(cfg, strategy)
    apply_quorum(strategy, cfg.federation.quorum)
    if start.checkpoint is not None:
        check_checkpoint_fits(run_dir, reference, {k: v.shape for k, v in start.checkpoint.arrays.items()})
        load_strategy_state(strategy, start.checkpoint.strategy_state)
        set_rng_state(start.checkpoint.state["rng"])
        arrays = _to_record(start.checkpoint.arrays)
    else:
        random.seed(cfg.seed)  # Flower samples nodes with Python's global RNG
        np.random.seed(cfg.seed)
        arrays = _to_record(reference)
    deployed = _is_deployed(grid)

    def waiting(wait: SiteWait) -> None:
        # medfed server prints this (the ServerApp's own log reaches only Flower's run log).
        log.write({"event": "waiting_for_sites", "time": _now(),
                   "round": max(recorder.server_round, start.completed_rounds + 1), "answered": wait.answered,
                   "asked": wait.asked, "missing": list(wait.missing), "remaining_s": round(wait.remaining_s)})

    roster = _discover_sites(grid, cfg, deployed=deployed, run_dir=run_dir, on_wait=waiting if deployed else None)
    held_out_names = [role.name for role in roster.roles.values() if role.held_out and not role.problem]
    if held_out_names and cfg.federation.fraction_evaluate == 0:  # deployed: a site's node config says held out
        print(f"medfed: WARNING: held-out site(s) {', '.join(held_out_names)} only evaluate, but "
              "federation.fraction_evaluate is 0: they take no part in this run", flush=True)
    earlier = read_metrics(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []  # earlier starts
    instruction = _instruction_keys(cfg, run_key)
    log.write({"event": "start", "time": _now(), "resumed_from_round": start.completed_rounds,
               "num_rounds": cfg.rounds, "run_key": run_key, **_site_facts(cfg, held_out_names)})
    # By site name: a site restarted (insecure) or resumed comes back as another node.
    left_out = _still_left_out(earlier)

    def site_answered(node_id: int, role: SiteRole) -> None:
        recorder.node_names.setdefault(node_id, role.name)  # insecure sites have no name at the SuperLink
        # From this round on (asked before it starts).
        record = {"time": _now(), "round": max(recorder.server_round, start.completed_rounds + 1), "site": role.name}
        if role.problem and left_out.get(role.name) != role.problem:
            left_out[role.name] = role.problem
            log.write({"event": "site_left_out", **record, "reason": role.problem})
        elif not role.problem and role.name in left_out:
            del left_out[role.name]
            log.write({"event": "site_admitted", **record})

    for node_id, role in roster.roles.items():  # the answers before the "start" line
        site_answered(node_id, role)
    roster.on_answer = site_answered
    _check_enough_sites(cfg, roster, log)

    def end_of_round(local_round: int, round_arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal arrays
        arrays = round_arrays
        if local_round == 0 and start.checkpoint is not None:
            return None  # the checkpoint we resumed from already holds this state
        if local_round > 0:
            recorder.round_finished(cfg.rounds)
        state = {"rng": get_rng_state(), "history": recorder.history, "config": config_to_dict(cfg),
                 RUN_KEY_STATE: run_key}
        save_checkpoint(
            run_dir / CHECKPOINT_FILE, server_round=start.completed_rounds + local_round,
            arrays=numpy_arrays(round_arrays), strategy_state=strategy_state(strategy), state=state,
        )
        return None

    remaining = cfg.rounds - start.completed_rounds
    if remaining > 0 and start.completed_rounds:
        print(f"medfed: resuming after round {start.completed_rounds}: rounds {start.completed_rounds + 1} to "
              f"{cfg.rounds} (Flower's [ROUND i/{remaining}] counts the rounds left)", flush=True)
    if remaining > 0:
        guarded = QuorumGuard(strategy, min_sites=cfg.federation.quorum, num_sites=cfg.federation.num_sites,
                              timeout_s=cfg.federation.round_timeout_s, wait_for_all_first=not deployed,
                              on_rejected=lambda node, why: recorder.record_dropout("train", node, f"update rejected: {why}"),
                              on_evaluation_skipped=recorder.evaluation_skipped)
        poll = float(os.environ.get("MEDFED_REPLY_POLL_S", DEPLOYED_POLL_INTERVAL_S)) if deployed else None
        RoundOffsetStrategy(guarded, start.completed_rounds, recorder, roster, seed=cfg.seed).start(
            TransferGrid(RecordingGrid(grid, recorder, poll_interval_s=poll), cfg.federation.transfer_dtype), arrays,
            num_rounds=remaining, timeout=cfg.federation.round_timeout_s,
            train_config=train_config(cfg, instruction), evaluate_config=ConfigRecord(instruction),
            evaluate_fn=end_of_round,
        )
    final = {k: v.astype(reference[k].dtype, copy=False) for k, v in numpy_arrays(arrays).items()}
    save_arrays(run_dir / MODEL_FILE, final)
    log.write({"event": "end", "time": _now(), "rounds_done": cfg.rounds})
    build_report(run_dir)
    print_summary(run_dir)


def read_run_config(run_config: dict[str, Any]) -> tuple[ExperimentConfig, Path, bool]:
    """Split the run config into the experiment, the run directory and the resume flag."""
    flat = dict(run_config)
    run_dir_value = str(flat.pop(RUN_DIR_KEY, "") or os.environ.get(RUN_DIR_ENV, ""))
    resume = flat.pop(RESUME_KEY, os.environ.get(RESUME_ENV, "") == "1")
    if not isinstance(resume, bool):
        raise ValueError(f"Run config key '{RESUME_KEY}' must be true or false. Got {resume!r} instead.")
    cfg = from_run_config(flat)
    run_dir = Path(run_dir_value) if run_dir_value else Path(cfg.output_dir) / cfg.name
    return cfg, run_dir, resume


def _discover_sites(grid: Grid, cfg: ExperimentConfig, *, deployed: bool, run_dir: Path,
                    on_wait: Callable[[SiteWait], None] | None = None) -> SiteRoster:
    """Who the nodes are, asked before round 1: which sites are held out, the site names
    (a site whose first reply is an error is recorded by name, not node id; a simulated
    round that samples draws by them, the same on both engines), and in deployment whether
    each site's data fits the study and answers under the name its key is registered
    under (:data:`~medfed.server.run_files.REGISTERED_SITES_FILE`). Real sites come and go: a deployed server without
    held-out sites asks those connected (``medfed server`` waited for the sites), not all
    of them, or a server that started with a quorum would wait here for the absent ones.
    ``on_wait`` hears every :data:`~medfed.server.held_out.WAIT_REPORT_S` seconds whom the
    server still waits for (here and when a site joins later)."""
    from medfed.sites.profiles import num_held_out, num_nodes

    federation = cfg.federation
    # A site that never answers holds up round 1 this long (then it is sampled as any other).
    timeout_s = min(SITE_CHECK_TIMEOUT_S, federation.round_timeout_s)
    roster = SiteRoster(grid, check_data=deployed, timeout_s=timeout_s,
                        registered=(lambda: read_registered_sites(run_dir)) if deployed else None, on_wait=on_wait)
    roster.discover(num_nodes(federation) if num_held_out(federation) or not deployed else 0, timeout_s)
    return roster


def _still_left_out(records: list[dict[str, Any]]) -> dict[str, str]:
    """Site name -> reason, of the sites an earlier start of this run left out and did not take back."""
    left_out: dict[str, str] = {}
    for record in records:
        if record["event"] == "site_left_out":
            left_out[str(record.get("site"))] = str(record.get("reason"))
        elif record["event"] == "site_admitted":
            left_out.pop(str(record.get("site")), None)
    return left_out


def _check_enough_sites(cfg: ExperimentConfig, roster: SiteRoster, log: MetricsLog) -> None:
    """Stop before round 1 when the sites whose data fits are fewer than the quorum."""
    left_out = roster.left_out
    if not left_out:
        return
    fit = [node_id for node_id in roster.grid.get_node_ids()
           if node_id not in left_out and node_id not in roster.held_out_nodes]
    if len(fit) < cfg.federation.quorum:
        # The reasons went to metrics.jsonl (and medfed server's output) as each site was left out.
        names = ", ".join(sorted(role.name for role in left_out.values()))
        reason = (f"only {len(fit)} site(s) have data that fits the study, fewer than the quorum "
                  f"(federation.min_sites) of {cfg.federation.quorum}; left out: {names}")
        log.write({"event": "stopped", "time": _now(), "reason": reason})  # what medfed server reports
        raise QuorumError(f"{reason[0].upper()}{reason[1:]}. Have those sites fix their data, then resume the run.")


def _site_facts(cfg: ExperimentConfig, held_out_names: list[str]) -> dict[str, Any]:
    """What the report needs to know about the sites: patient group names, held-out site names."""
    from medfed.sites.profiles import plan_for

    facts: dict[str, Any] = {}
    plan = plan_for(cfg)
    if plan.groups:
        facts["groups"] = [group.name for group in plan.groups]
    if held_out_names:
        facts["held_out_sites"] = sorted(held_out_names)
    if cfg.federation.scenario:
        facts["scenario"] = cfg.federation.scenario
    return facts


def build_strategy(cfg: ExperimentConfig) -> MedfedStrategy:
    """The experiment's strategy plug-in, sized for the federation, with its reply policy."""
    return create_strategy(
        cfg.strategy.name, cfg.strategy.params, num_sites=cfg.federation.num_sites,
        fraction_train=cfg.federation.fraction_train, fraction_evaluate=cfg.federation.fraction_evaluate,
        num_rounds=cfg.rounds, num_groups=len(cfg.federation.groups) or None,
        reply_policy=ReplyPolicy(cfg.strategy.max_update_norm_z, cfg.strategy.clip_update_norm),
    )


def initial_model_arrays(cfg: ExperimentConfig, strategy: MedfedStrategy | None = None) -> dict[str, np.ndarray]:
    """The seeded initial global arrays, built from the dataset's metadata only.

    The strategy's client hooks decide what they are: the whole model (from
    ``model.init_from`` when set), or FairLoRA's adapters and head.
    """
    info = dataset_info(cfg.data.dataset)
    strategy = strategy if strategy is not None else build_strategy(cfg)
    hooks = strategy.client_hooks(strategy.client_params())
    spec = ModelSpec(cfg.model.name, info.num_classes, info.in_chans, cfg.data.img_size, cfg.model.init_from)
    torch.manual_seed(cfg.seed)
    return {k: v.detach().cpu().numpy().copy() for k, v in hooks.initial_arrays(spec).items()}


def train_config(cfg: ExperimentConfig, instruction: dict[str, str] | None = None) -> ConfigRecord:
    """The local-training settings sent to the sites every round (strategies may add keys),
    and what every instruction carries (:func:`_instruction_keys`; without it, an empty run key)."""
    t = cfg.train
    return ConfigRecord({
        "local-epochs": t.local_epochs, "batch-size": t.batch_size, "optimizer": t.optimizer,
        "lr": t.lr, "weight-decay": t.weight_decay, "momentum": t.momentum, **(instruction or {RUN_KEY: ""}),
    })


def _instruction_keys(cfg: ExperimentConfig, run_key: str) -> dict[str, str]:
    """The run's key, under which sites keep their local state (:mod:`medfed.client.site_state`),
    and with ``model.init_from`` its checkpoint's SHA-256: a site that loads the checkpoint
    itself (FairLoRA's backbone) loads only that file, not whatever lies at that path."""
    keys = {RUN_KEY: run_key}
    if cfg.model.init_from is not None:
        keys[INIT_DIGEST_KEY] = checkpoint_digest(cfg.model.init_from)
    return keys


def _run_key(run_dir: Path, start: RunStart) -> str:
    """This run's key: made at its first start, kept in every checkpoint (and the ``"start"``
    records) and read back by every resume (:func:`medfed.server.resume.run_key_of`), so that
    its sites find their local state again and never another run's.

    ``""`` for a run begun before medfed made keys: its sites go on with their folders
    without one."""
    key = run_key_of(run_dir, start.checkpoint.state if start.checkpoint is not None else None)
    # Not Python's or NumPy's RNG: a resumed run draws as an uninterrupted one.
    return key if key is not None else secrets.token_hex(8)


def _is_deployed(grid: Grid) -> bool:
    """True for the Grid of a ServerApp that a SuperLink runs (not the simulation's in-memory one)."""
    # Looked up, not imported: importing Flower's SuperLink grids takes about a second
    # (the in-process engine never needs them), and no HttpGrid exists before its module.
    http_grid = sys.modules.get("flwr.superlink.grid.http_grid")
    return http_grid is not None and isinstance(grid, http_grid.HttpGrid)


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
