"""The ClientApp: train and evaluate the global model on one site's data.

The same app serves Flower's simulation engine and a deployed SuperNode. The experiment
comes from ``context.run_config`` (:func:`medfed.config.from_run_config`), the site's
data from ``context.node_config`` (:func:`medfed.client.site_data.load_site_data`), the
round's settings from the ConfigRecord the strategy sends. What differs between
strategies (the model a site builds, how it loads the global arrays, an extra loss,
which arrays it sends back, what it keeps between rounds, what it fits to its own images
before evaluating) is asked of the strategy's client hooks
(:func:`medfed.strategies.client_hooks_for`); what a site keeps lives in its
``context.state`` and on disk (:mod:`medfed.client.site_state`). A reply carries the
arrays the hooks send (train only), one MetricRecord and a ConfigRecord ``"site"`` with the site's
name and wall time: never paths, file names, images or labels. Strategies that validate
replies (FedAvg) only count ArrayRecords and MetricRecords, so the extra ConfigRecord
passes.

Train reply metrics: ``num-examples``, ``loss`` (mean training loss of the last local
epoch) and ``acc``/``auc``/``balanced_acc`` of that epoch's predictions (running
metrics on augmented images, as the batches went by: no second pass over the data). Evaluate reply metrics: the same on the site's test split, plus
``confusion`` (the flattened ``[C, C]`` matrix, ints), ``num-classes`` and, only when the
study sets ``federation.pooled_test_metrics`` (off by default),
``score-hist`` (per-class histograms of the test scores over fixed bins,
:func:`medfed.data.pooled.score_histograms`, flattened: what the server needs for
pooled-test ACC and AUC). No per-sample score is sent, but the 200 bins are fine enough
that, for a small test split, the histogram and its per-group copies tell each test
image's label, group and score to within a bin (0.08 logit): they are as sensitive as
the scores themselves, though nothing links them to an image. Hence off by default: a
study that leaves ``federation.pooled_test_metrics`` false keeps them (and the per-group
confusions) at the sites.

Patient groups: Flower requires the same MetricRecord keys from every reply, so every
site sends the keys of every group of the study (``federation.groups``, else FairLoRA's
``num_groups``: :func:`~medfed.strategies.registry.study_group_count`), whatever groups it holds: ``acc-group-<g>``/``auc-group-<g>`` (NaN when the site has
none of group ``g``) and ``num-examples-group-<g>`` (its count); evaluate replies add
``confusion-group-<g>`` and ``score-hist-group-<g>``, which the server sums.

Every site answers the server's ``query`` (name, held out) without loading its images,
so that the server can leave held-out sites out of training; a deployed server also asks
whether the site's data fits the study (:func:`describe_site`), which only the run's
config tells, and leaves out a site whose data does not.

Errors: Flower sends an exception's text to the server as the error reply's reason, and
a site's errors name its files and folders. Each handler therefore logs the error in full
at the site and replies with its type only (:class:`SiteFailure`), unless it is a
:class:`SiteRefusal`, whose text is written to be shared, or a
:class:`~medfed.client.site_data.StudyMismatchError`, whose ``reason`` names no file.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from logging import ERROR, INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from medfed.client import LAST_ROUND_MARK
from medfed.client.site_data import (
    PARTITION_ID_KEY, SiteData, StudyMismatchError, derive_seed, load_site_data, policy_refusal, site_role,
    study_group_count,
)
from medfed.client.site_state import RUN_KEY, DamagedSiteState, ForeignSiteState, load_site_state, save_site_state
from medfed.client.task import (
    TrainSettings, evaluate, image_batches, make_loader, make_loss, make_optimizer, prediction_metrics, prepare_model,
    resolved_precision, round_learning_rate, scores_from_logits, seed_everything, select_device, train_epoch,
)
from medfed.config import ExperimentConfig, from_run_config, study_fingerprint
from medfed.data import ImageDataset, confusion, train_augmentation
from medfed.data.pooled import score_histograms
from medfed.errors import MedfedError
from medfed.strategies import ClientHooks, ModelSpec, client_hooks_for
from medfed.models.pretrained import PretrainedError
from medfed.strategies.hooks import INIT_DIGEST_KEY, GlobalModelMismatch
from medfed.strategies._groups import group_count_metrics
from medfed.transfer import numpy_from_wire, to_wire

__all__ = ["SiteFailure", "SiteRefusal", "app"]

app = ClientApp()


class SiteRefusal(RuntimeError):
    """A site declines an instruction; the message names no file and may reach the server."""


class SiteFailure(RuntimeError):
    """What the server learns of any other error at a site: its type, not its text."""


def _errors_stay_at_the_site(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Log a handler's error in full here; let only its type travel (see the module docstring)."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except SiteRefusal as error:
            log(ERROR, "[medfed] %s refused at this site: %s", handler.__name__, error)
            raise
        except StudyMismatchError as error:
            log(ERROR, "[medfed] %s refused at this site: %s", handler.__name__, error)
            raise SiteRefusal(f"the site's data does not fit the study: {error.reason}") from None
        except Exception as error:
            # An input error (medfed's own: a bad file, a folder missing) says all in its one
            # line; anything else is a bug, whose traceback the site's log keeps.
            log(ERROR, "[medfed] %s failed at this site: %s: %s", handler.__name__, type(error).__name__, error,
                exc_info=not isinstance(error, MedfedError))
            raise SiteFailure(f"{type(error).__name__} at the site; the site's log has the details") from None

    return guarded

_EVAL_BATCH = 256
#: Sites already warned, in this process, that they train on less than one batch.
_WARNED_SMALL: set[str] = set()
#: Sites that have said, in this process, which device and precision they train in.
_ANNOUNCED: set[str] = set()


@app.train()
@_errors_stay_at_the_site
def train(msg: Message, context: Context) -> Message:
    """Train the received global model for the configured local epochs."""
    start = time.perf_counter()
    cfg, site, device = _setup(context)
    if site.held_out:
        raise SiteRefusal(f"Site {site.name!r} is held out: it only evaluates the global model and never trains.")
    config = msg.content["config"]
    settings = _train_settings(config, cfg)
    server_round = int(config["server-round"])
    _check_round(server_round, cfg)
    if len(site.train) < settings.batch_size and site.name not in _WARNED_SMALL:
        _WARNED_SMALL.add(site.name)
        log(WARNING, "[%s] trains on %d image(s), fewer than one batch (%d): its updates and metrics are mostly "
            "noise (a small federation.dirichlet_alpha, or a quantity skew, can leave a site this small).",
            site.name, len(site.train), settings.batch_size)
    if site.name not in _ANNOUNCED:  # once per process: what this site trains on, and in what
        _ANNOUNCED.add(site.name)
        log(INFO, "[%s] trains on %s in %s", site.name, device,
            resolved_precision(device, cfg.train.precision, cfg.data.img_size))
    hooks = client_hooks_for(cfg.strategy.name)(config)
    run_key, study = str(config.get(RUN_KEY, "")), study_fingerprint(cfg)
    kept = _kept_state(context, site.name, study, server_round - 1, run_key)
    model = _model(cfg, site, hooks, msg, kept, device)
    # Seeded after the model is built: building it draws from the RNG only in a fresh process.
    seed = derive_seed(cfg.seed, server_round, site.key)
    seed_everything(seed)
    train_set = site.train.with_transform(train_augmentation(cfg.data.img_size))
    loader = make_loader(train_set, settings.batch_size, shuffle=True, seed=seed, device=device,
                         on_device=cfg.train.data_on_device)
    loss_fn = make_loss(site.info.task, site.train.class_counts())
    optimizer = make_optimizer(model, settings)
    extra_loss = hooks.extra_loss(model)
    for epoch in range(1, settings.epochs + 1):
        seen = _TrainingPredictions()  # the last epoch's are reported: no second pass
        fit = train_epoch(
            model, loader, loss_fn, optimizer, task=site.info.task, device=device, extra_loss=extra_loss,
            on_batch=seen, precision=cfg.train.precision, channels_last=cfg.train.channels_last,
            forward=hooks.forward,
        )
        log(INFO, "[%s] round %s epoch %d/%d  loss %.4f%s",
            site.name, _round_label(server_round, cfg), epoch, settings.epochs, fit["loss"],
            f" ({LAST_ROUND_MARK})" if server_round == cfg.rounds and epoch == settings.epochs else "")
    result = {"loss": fit["loss"], **seen.metrics(site.info.task)}
    # The hooks' entries first: the site's own metrics win over their defaults.
    metrics = {
        **hooks.reply_metrics(site.train.groups),
        **_metric_record(result, site.train, with_confusion=False, num_groups=study_group_count(cfg)),
    }
    save_site_state(context, site.name, server_round, hooks.local_state(model), run_key=run_key, study=study)
    return _reply(msg, site, start, metrics, to_wire(hooks.sent_arrays(model), cfg.federation.transfer_dtype))


@app.evaluate()
@_errors_stay_at_the_site
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received global model (with what the site keeps) on the site's test split."""
    start = time.perf_counter()
    cfg, site, device = _setup(context)
    config = msg.content["config"]
    hooks = client_hooks_for(cfg.strategy.name)(config)
    server_round = int(config.get("server-round", 0))
    _check_round(server_round, cfg)
    kept = _kept_state(context, site.name, study_fingerprint(cfg), server_round, str(config.get(RUN_KEY, "")))
    model = _model(cfg, site, hooks, msg, kept, device)
    adapted = hooks.before_evaluation(model, kept, image_batches(site.train, _EVAL_BATCH), device)
    if adapted:
        log(INFO, "[%s] %s.", site.name, adapted)
    # The test loss is the plain cross-entropy: the training loss's class weights come from
    # each site's own training counts, which would make sites' test losses incomparable
    # (and NaN for a class the site never trained on).
    loss_fn = make_loss(site.info.task)
    loader = make_loader(site.test, _EVAL_BATCH, shuffle=False)
    result = evaluate(model, loader, loss_fn, task=site.info.task, device=device, precision=cfg.train.precision,
                      channels_last=cfg.train.channels_last, forward=hooks.forward, keep_predictions=True)
    num_groups = study_group_count(cfg)
    metrics = {
        **hooks.reply_metrics(site.test.groups),
        **_metric_record(result, site.test, with_confusion=True, num_groups=num_groups),
    }
    if cfg.federation.pooled_test_metrics:
        metrics.update(_pooling_counts(site.info.task, *result["predictions"], num_groups))
    log(INFO, "[%s] round %s: test acc %.4f  auc %.4f  loss %.4f on %d image(s)%s", site.name,
        _round_label(server_round, cfg), result["acc"], result["auc"], result["loss"], len(site.test),
        f" ({LAST_ROUND_MARK})" if server_round == cfg.rounds else "")
    return _reply(msg, site, start, metrics)


@app.query()
@_errors_stay_at_the_site
def describe_site(msg: Message, context: Context) -> Message:
    """Say who this site is (name, held out); asked ``"site-check"``, also whether its data
    fits the study (``problem``: what does not, in words that name no file; ``""`` when it fits)."""
    cfg = from_run_config(context.run_config, strict=False)
    name, held_out = site_role(context.node_config, context.node_id, cfg)
    site = ConfigRecord({"name": name, "held-out": held_out})
    question = msg.content.config_records.get("config", ConfigRecord()).get("question")
    if question == "site-check":
        refusal = policy_refusal(context.node_config, cfg)
        if refusal is not None:
            log(ERROR, "[%s] the server leaves this site out: %s", name, refusal)
        site["problem"] = refusal or _data_problem(context, cfg, name)
    return Message(content=RecordDict({"site": site}), reply_to=msg)


def _data_problem(context: Context, cfg: ExperimentConfig, name: str) -> str:
    """What keeps this site's data out of the study, as the server may read it; ``""`` if nothing."""
    try:
        load_site_data(context.node_config, context.node_id, cfg)
    except StudyMismatchError as error:
        log(ERROR, "[%s] this site's data does not fit the study; the server leaves it out: %s", name, error)
        return f"the site's data does not fit the study: {error.reason}"
    except Exception as error:  # noqa: BLE001 - its text may name files: only the type leaves the site
        log(ERROR, "[%s] this site's data cannot be read; the server leaves it out: %s: %s",
            name, type(error).__name__, error)
        return f"{type(error).__name__} reading the site's data; the site's log has the details"
    return ""


def _check_round(server_round: int, cfg: ExperimentConfig) -> None:
    """A round beyond the study's is no instruction of this study's server."""
    if server_round > cfg.rounds:
        raise SiteRefusal(f"round {server_round} is beyond the study's {cfg.rounds} rounds")


def _kept_state(context: Context, name: str, study: str, latest_round: int, run_key: str) -> dict:
    """What the site kept for the study ``study`` (:func:`load_site_state`); another study's is refused."""
    try:
        return load_site_state(context, name, latest_round=latest_round, run_key=run_key, study=study)
    except DamagedSiteState as error:
        log(ERROR, "[%s] %s.", name, error)
        raise SiteRefusal("the site's kept state for this run cannot be read; the site's log names the file and "
                          "what to do") from None
    except ForeignSiteState as error:
        log(ERROR, "[%s] %s; not read.", name, error)
        if error.legacy:
            raise SiteRefusal(
                "the site's state for this run was written by an older medfed, which did not record its study, so "
                "it is not read: a run begun with that version cannot be resumed; start it afresh"
            ) from None
        raise SiteRefusal(
            "the site keeps another study's state under this run key (a server reuses run keys only to resume "
            "the same study): start the study afresh"
        ) from None


def _round_label(server_round: int, cfg: ExperimentConfig) -> str:
    """``"3/20"``: the site's operator sees how far the study is."""
    return f"{server_round}/{cfg.rounds}"


def _setup(context: Context) -> tuple[ExperimentConfig, SiteData, torch.device]:
    # strict=False: a run config may carry server-only keys (run-dir, resume).
    cfg = from_run_config(context.run_config, strict=False)
    refusal = policy_refusal(context.node_config, cfg)
    if refusal is not None:  # before anything imports the strategy's module
        raise SiteRefusal(refusal)
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


#: ConfigRecord keys of the round's local-training settings (sent by the strategy,
#: from ``server_app.train_config``) -> TrainSettings fields.
_TRAIN_KEYS = {
    "local-epochs": ("epochs", int), "batch-size": ("batch_size", int), "optimizer": ("optimizer", str),
    "lr": ("lr", float), "weight-decay": ("weight_decay", float), "momentum": ("momentum", float),
}


def _train_settings(config: ConfigRecord, cfg: ExperimentConfig) -> TrainSettings:
    """The round's settings, from the strategy's ConfigRecord only (one source: the
    experiment config the server read); the learning rate decays over the rounds
    (:func:`round_learning_rate`)."""
    missing = [key for key in (*_TRAIN_KEYS, "server-round") if key not in config]
    if missing:
        raise ValueError(
            f"The training instruction lacks {missing}; the server sends them from the experiment's 'train' "
            "section (is it a medfed server of the same version?)."
        )
    values = {field: kind(config[key]) for key, (field, kind) in _TRAIN_KEYS.items()}
    values["lr"] = round_learning_rate(values["lr"], int(config["server-round"]), cfg.rounds)
    return TrainSettings(**values)


#: Built models, per process: (hooks class, structure, ModelSpec) -> model. Every message
#: overwrites all of a model's changing state (global arrays, then what the site kept),
#: so sites served by one worker share the network but never each other's weights.
_MODELS: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
_MAX_MODELS = 2


def _model(
    cfg: ExperimentConfig, site: SiteData, hooks: ClientHooks, msg: Message, kept: dict, device: torch.device
) -> torch.nn.Module:
    digest = str(msg.content["config"].get(INIT_DIGEST_KEY, "")) or None
    if cfg.model.init_from is not None and digest is None:
        # medfed's server always sends it; without it a site would load whatever file lies at
        # a path the server names (say a Local-only site's private model) and send parts back.
        raise SiteRefusal("the study names a pretrained model (model.init_from) but the instruction carries no "
                          "SHA-256 of it; run the server's medfed version at the site")
    spec = ModelSpec(cfg.model.name, site.info.num_classes, site.info.in_chans, cfg.data.img_size, cfg.model.init_from,
                     init_sha256=digest)
    key = (type(hooks), hooks.model_key(), spec)
    if key not in _MODELS:
        try:
            _MODELS[key] = hooks.build_model(spec)
        except PretrainedError as error:
            # One answer for every failure: which files exist at the site is not the server's to learn.
            log(ERROR, "[%s] %s", site.name, error)
            raise SiteRefusal("the study's pretrained model (model.init_from) is not at this site as the server has "
                              "it; copy the server's file to the path the study names") from None
        while len(_MODELS) > _MAX_MODELS:
            _MODELS.popitem(last=False)
    model = _MODELS[key]
    received = numpy_from_wire(msg.content["arrays"])
    try:
        hooks.load_global(model, OrderedDict((key, torch.from_numpy(value)) for key, value in received.items()), kept)
    except GlobalModelMismatch as error:  # names arrays and shapes only: the server may be told
        raise SiteRefusal(f"the global model does not fit this site's model ({error}); run the server's medfed "
                          "version at the site") from None
    return prepare_model(model, device, channels_last=cfg.train.channels_last, compile=cfg.train.compile)


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


def _metric_record(result: dict, split: ImageDataset, *, with_confusion: bool, num_groups: int = 0) -> dict:
    """Flatten :func:`medfed.client.task.evaluate`-style results on ``split`` into MetricRecord values.

    Group keys are written for groups ``0 .. num_groups - 1`` whether or not the site
    holds them (NaN and a count of 0 when not), so that every site's reply has the
    same keys; groups outside that range are not reported. Counts are the split's
    (``num-examples`` too), not those of the batches a training epoch happened to see.
    """
    metrics = {"num-examples": len(split), **{k: float(result[k]) for k in ("loss", "acc", "auc", "balanced_acc")}}
    if with_confusion:
        matrix = np.asarray(result["confusion"])
        metrics["confusion"] = [int(v) for v in matrix.reshape(-1)]
        metrics["num-classes"] = int(matrix.shape[-1] if matrix.ndim == 2 else matrix.shape[0])
    held = result.get("groups", {})
    for group in range(num_groups):
        values = held.get(group, {})
        metrics[f"acc-group-{group}"] = float(values.get("acc", float("nan")))
        metrics[f"auc-group-{group}"] = float(values.get("auc", float("nan")))
    return {**metrics, **group_count_metrics(split.groups, num_groups)}


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
