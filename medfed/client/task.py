"""Local training and evaluation loops, shared by every site and by pooled training.

Everything here is plain PyTorch: no Flower. The ClientApp calls these functions
with the site's data; ``medfed train`` calls them with the pooled data.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medfed.config import TrainConfig
from medfed.data import classification_metrics, confusion, group_metrics
from medfed.errors import MedfedError

__all__ = [
    "AUTO_BFLOAT16_MIN_SIDE",
    "resolved_precision",
    "TrainSettings",
    "prepare_model",
    "check_device",
    "select_device",
    "DeviceError",
    "TrainingDivergedError",
    "seed_everything",
    "make_loader",
    "image_batches",
    "make_loss",
    "LOSS_WEIGHTINGS",
    "make_optimizer",
    "make_scheduler",
    "cosine_factor",
    "round_learning_rate",
    "train_epoch",
    "predict",
    "evaluate",
    "prediction_metrics",
    "scores_from_logits",
    "get_weights",
]

MULTI_LABEL = "multi-label, binary-class"

#: Default class weighting of the training loss (see :func:`make_loss`).
DEFAULT_LOSS_WEIGHTING = "balanced"


_DEFAULTS = TrainConfig()  # the experiment config is the one source of default values


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation settings (one site, one round, or a whole pooled run).

    Defaults are those of the experiment config's ``train`` section
    (:class:`medfed.config.TrainConfig`). The last four are speed knobs (measured in
    ``docs/performance.md``): ``precision`` ("auto": bfloat16 autocast on CUDA for images of
    :data:`AUTO_BFLOAT16_MIN_SIDE` px or more, float32 otherwise; or "float32" /
    "bfloat16" everywhere), ``channels_last`` (model and images in channels-last memory
    format), ``compile`` (``torch.compile`` the model) and ``data_on_device`` (keep the
    training split on the GPU when it fits, :mod:`medfed.client.device_loader`).
    """

    epochs: int = _DEFAULTS.local_epochs
    batch_size: int = _DEFAULTS.batch_size
    optimizer: str = _DEFAULTS.optimizer
    lr: float = _DEFAULTS.lr
    weight_decay: float = _DEFAULTS.weight_decay
    momentum: float = _DEFAULTS.momentum
    precision: str = _DEFAULTS.precision
    channels_last: bool = _DEFAULTS.channels_last
    compile: bool = _DEFAULTS.compile
    data_on_device: bool = _DEFAULTS.data_on_device


class DeviceError(MedfedError):
    """A requested torch device is unknown or not on this machine."""


class TrainingDivergedError(MedfedError, FloatingPointError):
    """The training loss became NaN or infinite (a learning rate too high, or NaN in the images)."""


def _available_devices() -> list[str]:
    devices = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0))]
    return devices + (["mps"] if torch.backends.mps.is_available() else [])


def check_device(preferred: str | None = None) -> torch.device:
    """The device ``preferred`` names (None: CUDA when present, else the CPU), checked to be
    on this machine; nothing is set up on it.

    Raises
    ------
    DeviceError
        If ``preferred`` is not a device string or names a device this machine lacks
        (found here rather than at the first tensor moved, after the data is loaded).
    """
    if not preferred:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = _available_devices()
    try:
        device = torch.device(preferred)
    except RuntimeError:
        raise DeviceError(f"Unknown device {preferred!r}: use one this machine has ({', '.join(available)}).") from None
    # Other torch device types (meta, xpu, ...) are none that medfed trains on.
    name = {"cpu": "cpu", "cuda": f"cuda:{device.index or 0}"}.get(device.type, device.type)
    if name not in available:
        raise DeviceError(f"Device {preferred!r} is not on this machine: use one it has ({', '.join(available)}).")
    return device


def select_device(preferred: str | None = None) -> torch.device:
    """The device this process trains on: :func:`check_device`, made the current GPU when it
    names one (code that uses the current GPU rather than its tensors', NATTEN's kernels and
    autocast's bfloat16 check, would otherwise run on cuda:0).

    Raises
    ------
    DeviceError
        As :func:`check_device`.
    """
    device = check_device(preferred)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so that a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: ``precision: auto`` autocasts to bfloat16 on CUDA for images whose shorter side is at
#: least this many px. From one H200 lease (``docs/performance.md``, "Training speed
#: knobs"; nano and tiny, training; each precision in its own process): at 28 px float32
#: was faster in three comparisons out of three (one of them within one process), at 64 px
#: in two of two, where MedViTV2's steps are bound by kernel launches and autocast only adds
#: casts; at 224 px bfloat16 was 1.1-1.4x faster with about 0.6x the memory. 128 px was not
#: measured and stays float32. Tentative: a launch-bound step's rate moved by up to 30%
#: between processes, as large as some of these differences.
AUTO_BFLOAT16_MIN_SIDE = 224


def resolved_precision(device: torch.device, precision: str, image_side: int) -> str:
    """What ``precision`` (a :class:`TrainSettings` value) trains in: ``"float32"`` or
    ``"bfloat16"`` (autocast), on ``device`` for images whose shorter side is ``image_side`` px."""
    # "auto": bf16 autocast on CUDA needs no loss scaling, and pays where the model is bound
    # by arithmetic (large images); the CPU stays in fp32, where bf16 would be slower on most
    # CPUs and less exact.
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"Unknown precision {precision!r}. Expected 'auto', 'float32' or 'bfloat16'.")
    if precision == "auto":
        large = image_side >= AUTO_BFLOAT16_MIN_SIDE
        return "bfloat16" if device.type == "cuda" and large and _native_bfloat16(device) else "float32"
    return precision


def _native_bfloat16(device: torch.device) -> bool:
    """Whether the GPU computes bfloat16 in hardware (Ampere, compute capability 8, and
    later); older ones (a T4, a V100) emulate it, slower than float32."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def _autocast(device: torch.device, precision: str, image_side: int):
    if resolved_precision(device, precision, image_side) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def prepare_model(model: nn.Module, device: torch.device, *, channels_last: bool = False,
                  compile: bool = False) -> nn.Module:
    """Move ``model`` to ``device`` in the requested memory format and compile it once.

    ``nn.Module.compile`` compiles in place, so the state-dict keys (what a site sends)
    do not change; calling this again on a compiled model does not recompile it.
    """
    model = model.to(device=device, memory_format=_memory_format(channels_last))
    if compile and getattr(model, "_compiled_call_impl", None) is None:
        model.compile()
    return model


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                device: torch.device | None = None, on_device: bool = False) -> Iterable:
    """A loader whose order and augmentation depend only on ``seed`` (reproducible).

    With ``on_device`` and a CUDA ``device`` that the dataset fits on
    (:func:`medfed.client.device_loader.fits_on_device`), a
    :class:`~medfed.client.device_loader.DeviceLoader` that keeps the split on the GPU;
    otherwise a :class:`torch.utils.data.DataLoader`.
    """
    if on_device and device is not None and device.type == "cuda":
        from medfed.client.device_loader import DeviceLoader, fits_on_device

        if fits_on_device(dataset, device):
            return DeviceLoader(dataset, batch_size, device, shuffle=shuffle, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(dataset) > batch_size,  # a batch of 1 breaks BatchNorm
        generator=generator,
        num_workers=0,
    )


def image_batches(dataset: Dataset, batch_size: int) -> Iterator[torch.Tensor]:
    """The dataset's images as ``[B, C, H, W]`` batches, in order, without labels or groups (lazy)."""
    for images, _labels, _groups in make_loader(dataset, batch_size, shuffle=False):
        yield images


#: Class weightings of :func:`make_loss`.
LOSS_WEIGHTINGS = ("none", "sqrt", "balanced")


def make_loss(
    task: str,
    class_counts: np.ndarray | None = None,
    *,
    weighting: str = DEFAULT_LOSS_WEIGHTING,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Cross-entropy (BCE for multi-label), optionally weighted by class frequency.

    Parameters
    ----------
    task : str
        MedMNIST task string; multi-label tasks get an unweighted BCE, as MedMNIST's
        baselines do.
    class_counts : array of int, optional
        Training samples per class ``[C]``; needed for a weighting other than "none".
    weighting : {"none", "sqrt", "balanced"}
        Class ``c`` (``n_c`` samples of ``n``) is weighted by 1, by ``sqrt(n / (C n_c))``
        or by ``n / (C n_c)`` (scikit-learn's "balanced"); the mean-reduced loss divides
        by the targets' summed weights, so only ratios matter. "balanced" optimises
        balanced accuracy, which moves
        the decision threshold away from the class prior that plain ACC rewards.
    label_smoothing : float
        Cross-entropy label smoothing in ``[0, 1)``.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"Unknown loss weighting {weighting!r}. Expected one of {list(LOSS_WEIGHTINGS)}.")
    if task == MULTI_LABEL:
        return nn.BCEWithLogitsLoss()
    weight = None
    if class_counts is not None and weighting != "none":
        counts = np.asarray(class_counts, dtype=np.float64)
        present = counts > 0
        balanced = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
        if weighting == "sqrt":
            balanced = np.sqrt(balanced)
        weight = torch.tensor(balanced, dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on norms and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    raise ValueError(f"Unknown optimizer '{settings.optimizer}'. Expected 'adamw' or 'sgd'.")


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.01
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay to ``min_lr_ratio`` x lr, stepped per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return cosine_factor(step - warmup_steps, total_steps - warmup_steps, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def round_learning_rate(lr: float, server_round: int, num_rounds: int) -> float:
    """A site's learning rate in ``server_round`` (1-based) of ``num_rounds``.

    Decays by a cosine from ``lr`` in round 1 toward 5 %, the value it would reach one
    round after the last (the last of 20 rounds trains at about 6 %, the second of 2 at
    52.5 %): with a constant rate the global model keeps oscillating from round to round.
    """
    return lr * cosine_factor(server_round - 1, num_rounds, min_ratio=0.05)


def cosine_factor(step: int, total: int, min_ratio: float = 0.01) -> float:
    """Cosine decay from 1 at ``step`` 0 to ``min_ratio`` at ``step >= total``."""
    progress = min(1.0, step / max(1, total))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _targets(labels: torch.Tensor, task: str) -> torch.Tensor:
    return labels.float() if task == MULTI_LABEL else labels.long().view(-1)


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    task: str,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    precision: str = "auto",
    channels_last: bool = False,
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns ``{"loss": mean training loss}``.

    The loss returned is ``loss_fn``'s alone, per image: a strategy's extra term is
    optimised but not counted, so that training losses compare across strategies.

    Args:
        extra_loss: Optional ``f(logits, targets) -> scalar`` added to the loss;
            the hook through which a strategy adds its client-side term
            (FedProx's proximal term, FedLD's margin).
        on_batch: Called after every step with ``(logits, labels, groups)`` (detached):
            progress display, or metrics of the training pass without a second pass.
        precision, channels_last: Speed knobs (:class:`TrainSettings`).
        forward: Optional ``f(model, images, groups) -> logits`` replacing
            ``model(images)`` (a strategy's hook: FairLoRA passes the group ids).
    """
    model.train()
    loss_fn = loss_fn.to(device)
    total, count = 0.0, 0
    for images, labels, _groups in loader:
        images = images.to(device, non_blocking=True, memory_format=_memory_format(channels_last))
        targets = _targets(labels, task).to(device)
        with _autocast(device, precision, min(images.shape[-2:])):
            logits = model(images) if forward is None else forward(model, images, _groups)
            task_loss = loss_fn(logits.float(), targets)
            loss = task_loss if extra_loss is None else task_loss + extra_loss(logits.float(), targets)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"Training loss became {loss.item()}: lower the learning rate (now "
                f"{optimizer.param_groups[0]['lr']:.3g}) or check the images for NaN."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += task_loss.item() * len(images)
        count += len(images)
        if on_batch is not None:
            on_batch(logits.detach().float(), labels, _groups)
    return {"loss": total / max(count, 1)}


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable,
    *,
    task: str,
    device: torch.device,
    mirror: bool = True,
    precision: str = "auto",
    channels_last: bool = False,
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, ...]:
    """Probabilities, labels and groups over a loader.

    With ``mirror`` (for models trained on mirrored images too) the logits are the mean
    over each image and its horizontal mirror: a cheap, steadier estimate.
    ``precision`` and ``channels_last`` are speed knobs (:class:`TrainSettings`); ``forward``
    as in :func:`train_epoch` (a strategy's hook: FairLoRA passes the group ids).

    Returns:
        ``(y_score [N, C], y_true [N] or [N, L], groups [N], logits [N, C])``;
        scores are softmax probabilities (sigmoid for multi-label).
    """
    model.eval()
    if forward is None:
        forward = _plain_forward
    scores, trues, groups, logits_all = [], [], [], []
    for images, labels, group in loader:
        images = images.to(device, memory_format=_memory_format(channels_last))
        with _autocast(device, precision, min(images.shape[-2:])):
            logits = forward(model, images, group).float()
            if mirror:
                logits = 0.5 * (logits + forward(model, torch.flip(images, dims=[3]), group).float())
        scores.append(scores_from_logits(logits, task))
        logits_all.append(logits.cpu())
        trues.append(labels.numpy())
        groups.append(group.numpy())
    if not scores:
        raise ValueError("Cannot evaluate on an empty dataset.")
    return np.concatenate(scores), np.concatenate(trues), np.concatenate(groups), torch.cat(logits_all)


def _plain_forward(model: nn.Module, images: torch.Tensor, _groups: torch.Tensor) -> torch.Tensor:
    return model(images)


def scores_from_logits(logits: torch.Tensor, task: str) -> np.ndarray:
    """Softmax probabilities ``[N, C]`` (sigmoid for multi-label) as NumPy."""
    probs = torch.sigmoid(logits) if task == MULTI_LABEL else torch.softmax(logits, dim=1)
    return probs.detach().cpu().numpy()


def prediction_metrics(task: str, y_true: np.ndarray, y_score: np.ndarray, groups: np.ndarray | None = None) -> dict:
    """ACC, AUC, balanced accuracy, the confusion matrix and, where samples carry a
    group (id >= 0), ``"groups"``: ``{group: {"acc", "auc", ...}}``."""
    metrics = {**classification_metrics(task, y_true, y_score), "confusion": confusion(task, y_true, y_score)}
    if groups is not None and (np.asarray(groups) >= 0).any():
        metrics["groups"] = group_metrics(task, y_true, y_score, groups)
    return metrics


def evaluate(
    model: nn.Module,
    loader: Iterable,
    loss_fn: nn.Module,
    *,
    task: str,
    device: torch.device,
    mirror: bool = True,
    precision: str = "auto",
    channels_last: bool = False,
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    keep_predictions: bool = False,
) -> dict:
    """Loss plus :func:`prediction_metrics` on a loader (one pass; see :func:`predict`).

    With ``keep_predictions``, the dict also holds ``"predictions"``:
    ``(y_true, y_score, groups)``, NumPy arrays from :func:`predict` (which returns
    them in another order, with the logits).
    """
    y_score, y_true, groups, logits = predict(model, loader, task=task, device=device, mirror=mirror,
                                              precision=precision, channels_last=channels_last, forward=forward)
    targets = _targets(torch.as_tensor(y_true), task)
    loss = float(loss_fn.cpu()(logits, targets))
    result = {"loss": loss, **prediction_metrics(task, y_true, y_score, groups)}
    if keep_predictions:
        result["predictions"] = (y_true, y_score, groups)
    return result


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as NumPy arrays (what a site sends)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
