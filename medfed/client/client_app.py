"""The ClientApp: train and evaluate the global model on one site's data.

The same app serves Flower's simulation engine and a deployed SuperNode. The experiment
comes from ``context.run_config`` (:func:`medfed.config.from_run_config`), the site's
data from ``context.node_config`` (:func:`medfed.client.site_data.load_site_data`), the
round's settings from the ConfigRecord the strategy sends. A reply carries the model's
arrays (train only), one MetricRecord and a ConfigRecord ``"site"`` with the site's
name and wall time: never paths, file names, images or labels. Strategies that validate
replies (FedAvg) only count ArrayRecords and MetricRecords, so the extra ConfigRecord
passes.

Train reply metrics: ``num-examples``, ``loss`` (mean training loss of the last local
epoch) and ``acc``/``auc``/``balanced_acc`` of that epoch's predictions (running
metrics on augmented images, as the batches went by: no second pass over the data), plus ``acc-group-<g>``/``auc-group-<g>`` where samples carry a
patient group. Evaluate reply metrics: the same on the site's test split, plus
``confusion`` (the flattened ``[C, C]`` matrix, ints) and ``num-classes``.
"""

from __future__ import annotations

import functools
import time
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from medfed.client.site_data import PARTITION_ID_KEY, SiteData, derive_seed, load_site_data
from medfed.client.task import (
    TrainSettings, evaluate, make_loader, make_loss, make_optimizer, prediction_metrics, round_learning_rate,
    scores_from_logits, seed_everything, select_device, train_epoch,
)
from medfed.config import ExperimentConfig, from_run_config
from medfed.data import train_augmentation
from medfed.models import create_model

__all__ = ["app"]

app = ClientApp()

_EVAL_BATCH = 256


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model for the configured local epochs."""
    start = time.perf_counter()
    cfg, site, device = _setup(context)
    config = msg.content["config"]
    settings = _train_settings(config, cfg)
    model = _model(cfg, site, msg, device)
    # Seeded after the model is built: building it draws from the RNG only in a fresh process.
    seed = derive_seed(cfg.seed, int(config["server-round"]), site.key)
    seed_everything(seed)
    train_set = site.train.with_transform(train_augmentation(cfg.data.img_size))
    loader = make_loader(train_set, settings.batch_size, shuffle=True, seed=seed)
    loss_fn = make_loss(site.info.task, site.train.class_counts())
    optimizer = make_optimizer(model, settings)
    extra_loss = _proximal_term(model, float(config.get("proximal-mu", 0.0)))
    for epoch in range(1, settings.epochs + 1):
        seen = _TrainingPredictions()  # the last epoch's are reported: no second pass
        fit = train_epoch(
            model, loader, loss_fn, optimizer, task=site.info.task, device=device, extra_loss=extra_loss,
            on_batch=seen,
        )
        log(INFO, "[%s] round %s epoch %d/%d  loss %.4f",
            site.name, config["server-round"], epoch, settings.epochs, fit["loss"])
    result = {"loss": fit["loss"], **seen.metrics(site.info.task)}
    metrics = _metric_record(result, len(site.train), with_confusion=False)
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return _reply(msg, site, start, metrics, arrays)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the site's test split."""
    start = time.perf_counter()
    cfg, site, device = _setup(context)
    model = _model(cfg, site, msg, device)
    loss_fn = make_loss(site.info.task, site.train.class_counts())
    loader = make_loader(site.test, _EVAL_BATCH, shuffle=False)
    result = evaluate(model, loader, loss_fn, task=site.info.task, device=device)
    return _reply(msg, site, start, _metric_record(result, len(site.test), with_confusion=True))


def _setup(context: Context) -> tuple[ExperimentConfig, SiteData, torch.device]:
    # strict=False: a run config may carry server-only keys (run-dir, resume).
    cfg = from_run_config(context.run_config, strict=False)
    device = select_device(str(context.node_config.get("device", "")) or None)  # a deployed site may choose
    if PARTITION_ID_KEY in context.node_config:
        # Simulated sites share one machine: a fixed thread count per site keeps CPU
        # results identical from run to run (reduction order depends on threads), and
        # a site given no GPU share stays on the CPU whatever devices it can see.
        torch.set_num_threads(max(1, int(cfg.simulation.cpus_per_site)))
        if cfg.simulation.gpus_per_site == 0:
            device = torch.device("cpu")
    site = load_site_data(context.node_config, context.node_id, cfg)
    return cfg, site, device


def _train_settings(config: ConfigRecord, cfg: ExperimentConfig) -> TrainSettings:
    """The round's settings: the strategy's ConfigRecord, else the experiment's;
    the learning rate decays over the rounds (:func:`round_learning_rate`)."""
    lr = round_learning_rate(float(config.get("lr", cfg.train.lr)), int(config["server-round"]), cfg.rounds)
    return TrainSettings(
        epochs=int(config.get("local-epochs", cfg.train.local_epochs)),
        batch_size=int(config.get("batch-size", cfg.train.batch_size)),
        optimizer=str(config.get("optimizer", cfg.train.optimizer)),
        lr=lr,
        weight_decay=float(config.get("weight-decay", cfg.train.weight_decay)),
        momentum=float(config.get("momentum", cfg.train.momentum)),
    )


@functools.lru_cache(maxsize=2)
def _cached_model(name: str, num_classes: int, in_chans: int, img_size: int) -> torch.nn.Module:
    # Built once per process: every message loads all of the model's state anyway.
    return create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size)


def _model(cfg: ExperimentConfig, site: SiteData, msg: Message, device: torch.device) -> torch.nn.Module:
    model = _cached_model(cfg.model.name, site.info.num_classes, site.info.in_chans, cfg.data.img_size)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    return model.to(device)


def _proximal_term(model: torch.nn.Module, mu: float):
    """FedProx's ``mu / 2 * ||w - w_global||^2`` as an extra loss, or None when mu is 0."""
    if mu <= 0:
        return None
    anchors = [p.detach().clone() for p in model.parameters()]

    def term(_logits: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors))

    return term


class _TrainingPredictions:
    """Collects the scores of a training pass (``train_epoch``'s ``on_batch`` hook)."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.groups: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        self.logits.append(logits.cpu())
        self.labels.append(labels)
        self.groups.append(groups)

    def metrics(self, task: str) -> dict:
        """Metrics of the pass: taken while the weights moved, on augmented images."""
        scores = scores_from_logits(torch.cat(self.logits), task)
        return prediction_metrics(task, torch.cat(self.labels).numpy(), scores, torch.cat(self.groups).numpy())


def _metric_record(result: dict, num_examples: int, *, with_confusion: bool) -> dict:
    """Flatten :func:`medfed.client.task.evaluate`-style results into MetricRecord values."""
    metrics = {"num-examples": num_examples, **{k: float(result[k]) for k in ("loss", "acc", "auc", "balanced_acc")}}
    if with_confusion:
        matrix = np.asarray(result["confusion"])
        metrics["confusion"] = [int(v) for v in matrix.reshape(-1)]
        metrics["num-classes"] = int(matrix.shape[-1] if matrix.ndim == 2 else matrix.shape[0])
    for group, values in result.get("groups", {}).items():
        metrics[f"acc-group-{group}"] = float(values["acc"])
        metrics[f"auc-group-{group}"] = float(values["auc"])
    return metrics


def _reply(msg: Message, site: SiteData, start: float, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    if arrays is not None:
        content["arrays"] = arrays
    content["site"]["time-s"] = time.perf_counter() - start
    return Message(content=content, reply_to=msg)
