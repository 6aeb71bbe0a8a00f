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
metrics on augmented images, as the batches went by: no second pass over the data). Evaluate reply metrics: the same on the site's test split, plus
``confusion`` (the flattened ``[C, C]`` matrix, ints), ``num-classes`` and
``score-hist`` (per-class histograms of the test scores over fixed bins,
:func:`medfed.data.pooled.score_histograms`, flattened: what the server needs for
pooled-test ACC and AUC without any per-sample score leaving the site).

Patient groups: Flower requires the same MetricRecord keys from every reply, so every
site sends the keys of every group the federation declares (``federation.groups``),
whatever groups it holds: ``acc-group-<g>``/``auc-group-<g>`` (NaN when the site has
none of group ``g``) and ``n-group-<g>`` (its count); evaluate replies add
``confusion-group-<g>`` and ``score-hist-group-<g>``, which the server sums.

A held-out site (:attr:`SiteData.held_out`) refuses to train; it answers the
server's ``query`` (name, held out) so the server can leave it out of training.
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

from medfed.client.site_data import PARTITION_ID_KEY, SiteData, derive_seed, load_site_data, site_role
from medfed.client.task import (
    TrainSettings, evaluate, make_loader, make_loss, make_optimizer, prediction_metrics, prepare_model,
    round_learning_rate,
    scores_from_logits, seed_everything, select_device, train_epoch,
)
from medfed.config import ExperimentConfig, from_run_config
from medfed.data import confusion, train_augmentation
from medfed.data.pooled import score_histograms
from medfed.models import create_model
from medfed.transfer import decode_arrays, encode_arrays

__all__ = ["app"]

app = ClientApp()

_EVAL_BATCH = 256


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model for the configured local epochs."""
    start = time.perf_counter()
    cfg, site, device = _setup(context)
    if site.held_out:
        raise RuntimeError(f"Site {site.name!r} is held out: it only evaluates the global model and never trains.")
    config = msg.content["config"]
    settings = _train_settings(config, cfg)
    model = _model(cfg, site, msg, device)
    # Seeded after the model is built: building it draws from the RNG only in a fresh process.
    seed = derive_seed(cfg.seed, int(config["server-round"]), site.key)
    seed_everything(seed)
    train_set = site.train.with_transform(train_augmentation(cfg.data.img_size))
    loader = make_loader(train_set, settings.batch_size, shuffle=True, seed=seed, device=device,
                         on_device=cfg.train.data_on_device)
    loss_fn = make_loss(site.info.task, site.train.class_counts())
    optimizer = make_optimizer(model, settings)
    extra_loss = _proximal_term(model, float(config.get("proximal-mu", 0.0)))
    for epoch in range(1, settings.epochs + 1):
        seen = _TrainingPredictions()  # the last epoch's are reported: no second pass
        fit = train_epoch(
            model, loader, loss_fn, optimizer, task=site.info.task, device=device, extra_loss=extra_loss,
            on_batch=seen, precision=cfg.train.precision, channels_last=cfg.train.channels_last,
        )
        log(INFO, "[%s] round %s epoch %d/%d  loss %.4f",
            site.name, config["server-round"], epoch, settings.epochs, fit["loss"])
    result = {"loss": fit["loss"], **seen.metrics(site.info.task)}
    metrics = _metric_record(result, len(site.train), with_confusion=False, num_groups=len(cfg.federation.groups))
    arrays = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return _reply(msg, site, start, metrics, encode_arrays(arrays, cfg.federation.transfer_dtype))


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the site's test split."""
    start = time.perf_counter()
    cfg, site, device = _setup(context)
    model = _model(cfg, site, msg, device)
    loss_fn = make_loss(site.info.task, site.train.class_counts())
    loader = make_loader(site.test, _EVAL_BATCH, shuffle=False)
    result = evaluate(model, loader, loss_fn, task=site.info.task, device=device, precision=cfg.train.precision,
                      channels_last=cfg.train.channels_last, keep_predictions=True)
    num_groups = len(cfg.federation.groups)
    metrics = _metric_record(result, len(site.test), with_confusion=True, num_groups=num_groups)
    metrics.update(_pooling_counts(site.info.task, *result["predictions"], num_groups))
    return _reply(msg, site, start, metrics)


@app.query()
def describe_site(msg: Message, context: Context) -> Message:
    """Say who this site is (name, held out), without loading its images."""
    cfg = from_run_config(context.run_config, strict=False)
    name, held_out = site_role(context.node_config, context.node_id, cfg)
    return Message(content=RecordDict({"site": ConfigRecord({"name": name, "held-out": held_out})}), reply_to=msg)


def _setup(context: Context) -> tuple[ExperimentConfig, SiteData, torch.device]:
    # strict=False: a run config may carry server-only keys (run-dir, resume).
    cfg = from_run_config(context.run_config, strict=False)
    device = select_device()
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
    model.load_state_dict(decode_arrays(msg.content["arrays"]).to_torch_state_dict(), strict=True)
    return prepare_model(model, device, channels_last=cfg.train.channels_last, compile=cfg.train.compile)


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


def _metric_record(result: dict, num_examples: int, *, with_confusion: bool, num_groups: int = 0) -> dict:
    """Flatten :func:`medfed.client.task.evaluate`-style results into MetricRecord values.

    Group keys are written for groups ``0 .. num_groups - 1`` whether or not the site
    holds them (NaN and a count of 0 when not), so that every site's reply has the
    same keys; groups outside that range are not reported.
    """
    metrics = {"num-examples": num_examples, **{k: float(result[k]) for k in ("loss", "acc", "auc", "balanced_acc")}}
    if with_confusion:
        matrix = np.asarray(result["confusion"])
        metrics["confusion"] = [int(v) for v in matrix.reshape(-1)]
        metrics["num-classes"] = int(matrix.shape[-1] if matrix.ndim == 2 else matrix.shape[0])
    held = result.get("groups", {})
    for group in range(num_groups):
        values = held.get(group, {})
        metrics[f"acc-group-{group}"] = float(values.get("acc", float("nan")))
        metrics[f"auc-group-{group}"] = float(values.get("auc", float("nan")))
        metrics[f"n-group-{group}"] = int(values.get("num_examples", 0))
    return metrics


def _pooling_counts(task: str, y_true: np.ndarray, y_score: np.ndarray, groups: np.ndarray, num_groups: int) -> dict:
    """Counts the server sums into pooled-test metrics: score histograms, per-group confusions."""
    counts = {"score-hist": [int(v) for v in score_histograms(task, y_true, y_score).reshape(-1)]}
    for group in range(num_groups):
        members = np.asarray(groups) == group
        counts[f"confusion-group-{group}"] = [int(v) for v in confusion(task, y_true[members], y_score[members]).reshape(-1)]
        counts[f"score-hist-group-{group}"] = [
            int(v) for v in score_histograms(task, y_true[members], y_score[members]).reshape(-1)
        ]
    return counts


def _reply(msg: Message, site: SiteData, start: float, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({
        "metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name, "held-out": site.held_out}),
    })
    if arrays is not None:
        content["arrays"] = arrays
    content["site"]["time-s"] = time.perf_counter() - start
    return Message(content=content, reply_to=msg)
