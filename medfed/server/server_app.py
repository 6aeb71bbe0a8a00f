"""The ServerApp: build the run from the experiment config and let Flower run the rounds.

The experiment comes from ``context.run_config`` (:func:`medfed.config.from_run_config`),
the same in simulation and deployment, plus two server-only keys:

* ``run-dir`` (str, ``""`` -> ``{output_dir}/{name}``): where the run's files go;
* ``resume`` (bool): continue the run in ``run-dir`` from its last complete round.

The rounds are Flower's own ``Strategy.start``. ``evaluate_fn``, which ``start`` calls
after every round's training and evaluation (and once before round 1), is the
end-of-round hook: it writes the ``"round"`` line of ``metrics.jsonl`` and then the
checkpoint (:mod:`medfed.server.checkpoint`), in that order, so a crash between the two
only repeats a round. The server never loads images: the model is built from the
dataset's metadata alone.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from medfed.config import ExperimentConfig, config_to_dict, from_run_config
from medfed.data import dataset_info
from medfed.server.checkpoint import save_arrays, save_checkpoint
from medfed.server.recording import RecordingGrid, RoundRecorder
from medfed.server.report import MetricsLog, build_report, print_summary
from medfed.server.transfer import TransferGrid
from medfed.server.resume import (
    CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, RoundOffsetStrategy, get_rng_state, prepare_run_dir, set_rng_state,
)
from medfed.strategies import ModelSpec, ReplyPolicy, create_strategy, load_strategy_state, strategy_state
from medfed.strategies.base import MedfedStrategy

__all__ = ["RESUME_KEY", "RUN_DIR_KEY", "app", "build_strategy", "initial_model_arrays", "read_run_config"]

RUN_DIR_KEY = "run-dir"
RESUME_KEY = "resume"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the experiment described by the run config."""
    cfg, run_dir, resume = read_run_config(context.run_config)
    start = prepare_run_dir(cfg, run_dir, resume)
    log = MetricsLog(run_dir / METRICS_FILE)
    recorder = RoundRecorder(log, task=dataset_info(cfg.data.dataset).task)
    recorder.history = start.history
    strategy = build_strategy(cfg)
    reference = initial_model_arrays(cfg, strategy)
    if start.checkpoint is not None:
        load_strategy_state(strategy, start.checkpoint.strategy_state)
        set_rng_state(start.checkpoint.state["rng"])
        arrays = _to_record(start.checkpoint.arrays)
    else:
        random.seed(cfg.seed)  # Flower samples nodes with Python's global RNG
        np.random.seed(cfg.seed)
        arrays = _to_record(reference)
    held_out_nodes = _held_out_nodes(grid, cfg)
    log.write({"event": "start", "time": _now(), "resumed_from_round": start.completed_rounds,
               "num_rounds": cfg.rounds, **_site_facts(cfg, held_out_nodes)})

    def end_of_round(local_round: int, round_arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal arrays
        arrays = round_arrays
        if local_round == 0 and start.checkpoint is not None:
            return None  # the checkpoint we resumed from already holds this state
        if local_round > 0:
            recorder.round_finished(cfg.rounds)
        state = {"rng": get_rng_state(), "history": recorder.history, "config": config_to_dict(cfg)}
        save_checkpoint(
            run_dir / CHECKPOINT_FILE, server_round=start.completed_rounds + local_round,
            arrays=_to_numpy(round_arrays), strategy_state=strategy_state(strategy), state=state,
        )
        return None

    remaining = cfg.rounds - start.completed_rounds
    if remaining > 0:
        RoundOffsetStrategy(strategy, start.completed_rounds, recorder, held_out_nodes).start(
            TransferGrid(RecordingGrid(grid, recorder), cfg.federation.transfer_dtype), arrays, num_rounds=remaining,
            train_config=train_config(cfg), evaluate_config=ConfigRecord(), evaluate_fn=end_of_round,
        )
    final = {k: v.astype(reference[k].dtype, copy=False) for k, v in _to_numpy(arrays).items()}
    save_arrays(run_dir / MODEL_FILE, final)
    log.write({"event": "end", "time": _now(), "rounds_done": cfg.rounds})
    build_report(run_dir)
    print_summary(run_dir)


def read_run_config(run_config: dict[str, Any]) -> tuple[ExperimentConfig, Path, bool]:
    """Split the run config into the experiment, the run directory and the resume flag."""
    flat = dict(run_config)
    run_dir_value = str(flat.pop(RUN_DIR_KEY, "") or "")
    resume = flat.pop(RESUME_KEY, False)
    if not isinstance(resume, bool):
        raise ValueError(f"Run config key '{RESUME_KEY}' must be true or false. Got {resume!r} instead.")
    cfg = from_run_config(flat)
    run_dir = Path(run_dir_value) if run_dir_value else Path(cfg.output_dir) / cfg.name
    return cfg, run_dir, resume


def _held_out_nodes(grid: Grid, cfg: ExperimentConfig) -> dict[int, str]:
    """Node id -> name of the held-out sites (asked only when the experiment has some)."""
    from medfed.sites.profiles import num_held_out, num_nodes

    if num_held_out(cfg.federation) == 0:
        return {}
    from medfed.server.held_out import discover_held_out_nodes

    return discover_held_out_nodes(grid, num_nodes(cfg.federation))


def _site_facts(cfg: ExperimentConfig, held_out_nodes: dict[int, str]) -> dict[str, Any]:
    """What the report needs to know about the sites: patient group names, held-out site names."""
    from medfed.sites.profiles import plan_for

    facts: dict[str, Any] = {}
    plan = plan_for(cfg)
    if plan.groups:
        facts["groups"] = [group.name for group in plan.groups]
    if held_out_nodes:
        facts["held_out_sites"] = sorted(held_out_nodes.values())
    if cfg.federation.scenario:
        facts["scenario"] = cfg.federation.scenario
    return facts


def build_strategy(cfg: ExperimentConfig) -> MedfedStrategy:
    """The experiment's strategy plug-in, sized for the federation, with its reply policy."""
    return create_strategy(
        cfg.strategy.name, cfg.strategy.params, num_sites=cfg.federation.num_sites,
        fraction_train=cfg.federation.fraction_train, fraction_evaluate=cfg.federation.fraction_evaluate,
        num_rounds=cfg.rounds,
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


def train_config(cfg: ExperimentConfig) -> ConfigRecord:
    """The local-training settings sent to the sites every round (strategies may add keys)."""
    t = cfg.train
    return ConfigRecord({
        "local-epochs": t.local_epochs, "batch-size": t.batch_size, "optimizer": t.optimizer,
        "lr": t.lr, "weight-decay": t.weight_decay, "momentum": t.momentum,
    })


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
