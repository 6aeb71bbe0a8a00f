"""Pooled (centralised) training: the upper bound a federation is compared with.

``medfed train`` trains one MedViTV2 variant on all of a dataset's training
split, picks the epoch by validation ACC and AUC (never by test), and reports test
metrics of that epoch.

MedMNIST validation splits can be small (78 images in BreastMNIST, 120 in
RetinaMNIST), so a single epoch's validation score is noisy and often peaks by luck in
the first epochs. The epoch is therefore chosen by the mean score of the last
``selection_window`` epochs (a trailing moving average; the weights are those of the
window's last epoch), and only once a full window has been seen.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medfed._io import OutputFolderError, check_output_folder, json_text, made_folder, write_bytes_atomic
from medfed.client.task import (
    DEFAULT_LOSS_WEIGHTING,
    TrainingDivergedError,
    TrainSettings,
    evaluate,
    get_weights,
    make_loader,
    make_loss,
    make_optimizer,
    make_scheduler,
    prepare_model,
    resolved_precision,
    seed_everything,
    select_device,
    train_epoch,
)
from medfed.data import DatasetValidationError, default_hflip_p, load_medmnist, train_augmentation
from medfed.models import create_model
from medfed.server.checkpoint import save_arrays
from medfed.server.run_files import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, TRAIN_METRICS_FILE

__all__ = ["train_pooled", "default_selection_window"]

#: Files that mark a folder as holding a run (of ``medfed train``, ``simulate`` or ``server``).
RUN_FILES = (TRAIN_METRICS_FILE, MODEL_FILE, METRICS_FILE, CHECKPOINT_FILE)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that cannot be made, holds private keys (a certificate folder
    given by mistake: :func:`~medfed._io.check_output_folder`) or already holds a run
    (nothing is overwritten).

    Raises
    ------
    OutputFolderError
        Checked before any training, so that hours of training never end in a refusal.
    """
    check_output_folder(out_dir, "--out")
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if held:
        raise OutputFolderError(
            f"{out_dir} already holds a run ({', '.join(held)}); train into another folder (--out), or move that "
            "run away first."
        )


def _check_splits(splits: dict, dataset: str, img_size: int) -> None:
    """Refuse an empty split now, not after an epoch of training (val) or all of them (test).

    (A site's file may lack a split, as a held-out hospital's lacks training images; pooled
    training needs all three.)"""
    from medfed.data.medmnist_files import medmnist_filename

    empty = [name for name, data in splits.items() if len(data) == 0]
    if empty:
        found = "/".join(str(len(data)) for data in splits.values())
        raise DatasetValidationError(
            f"{medmnist_filename(dataset, img_size)} has no {' and no '.join(empty)} images (train/val/test = {found}); "
            "medfed train needs images in all three splits."
        )


def default_selection_window(epochs: int) -> int:
    """Epochs averaged for selection: a tenth of the run, between 1 and 5."""
    return min(5, max(1, epochs // 10))


def _jsonable(metrics: dict) -> dict:
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in metrics.items()}


def train_pooled(
    *,
    dataset: str,
    data_root: str | Path | None,
    model_name: str,
    img_size: int,
    settings: TrainSettings,
    out_dir: str | Path,
    seed: int = 0,
    device: str | None = None,
    console: Console | None = None,
    loss_weighting: str = DEFAULT_LOSS_WEIGHTING,
    label_smoothing: float = 0.0,
    hflip_p: float | None = None,
    selection_window: int | None = None,
    on_epoch: Callable[[int, torch.nn.Module], None] | None = None,
) -> dict:
    """Train on the pooled training split; select by validation (ACC + AUC) / 2; test once.

    ``loss_weighting`` and ``label_smoothing`` go to :func:`medfed.client.task.make_loss`;
    ``hflip_p`` (``None``: :func:`medfed.data.default_hflip_p` of the dataset) is the
    mirroring probability of the training augmentation, and predictions average the
    mirror only when training mirrors; ``selection_window`` (``None``:
    :func:`default_selection_window`) is the trailing window of the epoch selection;
    ``on_epoch(epoch, model)`` is called after each epoch's validation (benchmarks use
    it to follow test metrics; selection never sees them).

    Writes ``out_dir/model.safetensors`` (the selected weights) and
    ``out_dir/metrics.json`` ``{"test": {...}, "val": {...}, "best_epoch": int,
    "history": [...], "config": {...}}``.

    Returns:
        The content of ``metrics.json``.

    Raises:
        OutputFolderError: ``out_dir`` cannot be made or already holds a run (checked
            first; a run that fails or is interrupted leaves no empty folder behind).
        TrainingDivergedError: the loss, or every epoch's validation score, was not finite.
    """
    console = console or Console()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    with made_folder(out_dir):  # made now (fails now, not after training); removed if the run fails
        seed_everything(seed)
        dev = select_device(device)
        splits = load_medmnist(dataset, data_root, size=img_size)
        _check_splits(splits, dataset, img_size)
        info = splits["train"].info
        hflip_p = default_hflip_p(dataset) if hflip_p is None else hflip_p
        mirror = hflip_p > 0
        window = default_selection_window(settings.epochs) if selection_window is None else selection_window
        window = max(1, min(window, settings.epochs))
        train_set = splits["train"].with_transform(train_augmentation(img_size, hflip_p=hflip_p))
        model = create_model(model_name, num_classes=info.num_classes, in_chans=info.in_chans, img_size=img_size)
        model = prepare_model(model, dev, channels_last=settings.channels_last, compile=settings.compile)
        # The speed knobs as a site applies them (medfed.client.client_app), so that the
        # settings recorded in metrics.json are those the run trained with.
        knobs = {"precision": settings.precision, "channels_last": settings.channels_last}
        loaders = {
            "train": make_loader(train_set, settings.batch_size, shuffle=True, seed=seed, device=dev,
                                 on_device=settings.data_on_device),
            "val": make_loader(splits["val"], 256, shuffle=False),
            "test": make_loader(splits["test"], 256, shuffle=False),
        }
        loss_fn = make_loss(
            info.task, splits["train"].class_counts(), weighting=loss_weighting, label_smoothing=label_smoothing
        )
        eval_loss_fn = make_loss(info.task)  # validation and test losses: plain cross-entropy
        optimizer = make_optimizer(model, settings)
        steps = settings.epochs * len(loaders["train"])
        scheduler = make_scheduler(optimizer, steps, warmup_steps=min(len(loaders["train"]), steps // 10))
        console.print(
            f"[bold]medfed train[/]: {model_name} on {dataset} ({len(train_set)} train / {len(splits['val'])} val / "
            f"{len(splits['test'])} test, {img_size} px) on {dev} in "
            f"{resolved_precision(dev, settings.precision, img_size)}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
        )
        best_score, best_epoch, best_state, history, scores = -float("inf"), 0, None, [], []
        start = time.perf_counter()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            bar = progress.add_task("epoch 1", total=steps)
            for epoch in range(1, settings.epochs + 1):
                progress.update(bar, description=f"epoch {epoch}/{settings.epochs}")
                fit = train_epoch(
                    model, loaders["train"], loss_fn, optimizer, task=info.task, device=dev,
                    scheduler=scheduler, on_batch=lambda *_batch: progress.advance(bar), **knobs,
                )
                val = evaluate(model, loaders["val"], eval_loss_fn, task=info.task, device=dev, mirror=mirror, **knobs)
                # The mean of the two metrics MedMNIST reports: AUC alone can pick an
                # epoch whose decision threshold is off (high AUC, poor ACC).
                scores.append((val["acc"] + val["auc"]) / 2 if val["auc"] == val["auc"] else val["acc"])
                score = sum(scores[-window:]) / window
                improved = len(scores) >= window and score > best_score
                if improved:
                    best_score, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
                if on_epoch is not None:
                    on_epoch(epoch, model)
                history.append({"epoch": epoch, "train_loss": fit["loss"], **_jsonable({k: v for k, v in val.items() if k not in ("confusion", "groups")})})
                progress.console.print(
                    f"epoch {epoch:3d}  loss {fit['loss']:.4f}  val acc {val['acc']:.4f} auc {val['auc']:.4f}"
                    + ("  *" if improved else "")
                )
        if best_state is None:  # every validation score NaN: the model predicts NaN in eval mode
            raise TrainingDivergedError(
                f"No epoch of the {settings.epochs} gave a finite validation score (ACC and AUC NaN: the model's "
                f"predictions are not finite); lower the learning rate (now {settings.lr:g})."
            )
        model.load_state_dict(best_state)
        val = evaluate(model, loaders["val"], eval_loss_fn, task=info.task, device=dev, mirror=mirror, **knobs)
        test = evaluate(model, loaders["test"], eval_loss_fn, task=info.task, device=dev, mirror=mirror, **knobs)
        save_arrays(out_dir / MODEL_FILE, get_weights(model))
        result = {
            "test": _jsonable(test),
            "val": _jsonable(val),
            "best_epoch": best_epoch,
            "train_time_s": round(time.perf_counter() - start, 1),
            "history": history,
            "config": {
                "dataset": dataset, "model": model_name, "img_size": img_size, "seed": seed,
                "device": str(dev), **asdict(settings),
                "precision_used": resolved_precision(dev, settings.precision, img_size), "loss_weighting": loss_weighting,
                "label_smoothing": label_smoothing, "hflip_p": hflip_p, "selection_window": window,
            },
        }
        write_bytes_atomic(out_dir / TRAIN_METRICS_FILE, json_text(result, indent=2).encode("utf-8"))
        console.print(
            f"best epoch {best_epoch} by val (ACC + AUC) / 2 over {window} epoch(s); [bold]test ACC {test['acc']:.4f} AUC {test['auc']:.4f}[/] "
            f"(balanced acc {test['balanced_acc']:.4f}); saved to {out_dir}"
        )
        return result
