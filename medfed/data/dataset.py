"""In-memory image classification dataset and the training augmentation.

Images are held as ``uint8`` arrays ``[N, H, W, C]`` (as stored in MedMNIST files) and
converted per sample to ``float32`` tensors ``[C, H, W]`` in ``[-1, 1]``; labels are
``int64`` ``[N]`` (multi-label: ``[N, L]`` in {0, 1}); an optional patient-group id per
sample (``-1`` = unknown) serves per-group (fairness) metrics.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import DatasetValidationError, LabelRangeError
from .info import DatasetInfo

__all__ = ["ImageDataset", "TrainAugmentation", "default_hflip_p", "train_augmentation", "UNKNOWN_GROUP"]

#: Datasets whose images are not mirrored in training. Chest radiographs have a
#: laterality (heart on the left) that a mirror breaks; on PneumoniaMNIST the ablation
#: (benchmarks/bench_recipe.py, README "Measured here") moved test ACC by less than the
#: thread count alone does, and mirroring helped BreastMNIST, so none is listed.
NO_MIRROR_DATASETS: frozenset[str] = frozenset()

#: Group id of a sample whose patient group is not known.
UNKNOWN_GROUP = -1

Transform = Callable[[torch.Tensor], torch.Tensor]


class ImageDataset(Dataset):
    """Images, labels and optional group ids of one split, held in memory.

    Parameters
    ----------
    images : np.ndarray
        ``uint8`` array ``[N, H, W, C]`` with ``C == info.in_chans`` (``[N, H, W]`` is
        accepted for one channel and viewed as ``[N, H, W, 1]``).
    labels : np.ndarray
        Integer array ``[N]`` (``[N, 1]`` is flattened) of class indices in
        ``[0, info.num_classes)``; for the multi-label task ``[N, L]`` of 0/1 with
        ``L == info.num_classes``. Stored as ``int64``.
    info : DatasetInfo
        Task, number of outputs, channels and label names.
    groups : np.ndarray or None, optional
        Integer array ``[N]`` of patient-group ids (``-1`` = unknown), or None when no
        sample has a known group. Stored as ``int64``.
    transform : callable or None, optional
        Applied to the ``float32`` image tensor ``[C, H, W]`` (already in ``[-1, 1]``)
        by :meth:`__getitem__`, e.g. :func:`train_augmentation`.

    Attributes
    ----------
    images, labels, groups, info, transform
        As above, after conversion.

    Raises
    ------
    DatasetValidationError
        Images, labels or groups of the wrong dtype or shape.
    LabelRangeError
        (A :class:`DatasetValidationError`.) A class index outside ``0 .. num_classes - 1``,
        or a multi-label target other than 0 and 1: a model with ``num_classes`` outputs
        cannot learn it, and :meth:`class_counts` would count classes the dataset does
        not have.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        info: DatasetInfo,
        groups: np.ndarray | None = None,
        transform: Transform | None = None,
    ) -> None:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != info.in_chans:
            raise DatasetValidationError(
                f"ImageDataset '{info.flag}' expects uint8 images [N, H, W, {info.in_chans}]. "
                f"Got {images.dtype} {tuple(images.shape)} instead."
            )
        n = images.shape[0]
        labels = np.asarray(labels)
        if not info.is_multi_label and labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        expected_shape = (n, info.num_classes) if info.is_multi_label else (n,)
        if labels.shape != expected_shape or not (
            np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_
        ):
            raise DatasetValidationError(
                f"ImageDataset '{info.flag}' expects integer labels of shape {expected_shape}. "
                f"Got {labels.dtype} {tuple(labels.shape)} instead."
            )
        _check_label_values(labels, info)
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (n,) or not np.issubdtype(groups.dtype, np.integer):
                raise DatasetValidationError(
                    f"ImageDataset '{info.flag}' expects integer groups of shape ({n},). "
                    f"Got {groups.dtype} {tuple(groups.shape)} instead."
                )
            groups = groups.astype(np.int64, copy=False)
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.groups = groups
        self.info = info
        self.transform = transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(image, label, group)`` of sample ``index``.

        Returns
        -------
        image : torch.Tensor
            ``float32`` ``[C, H, W]``, ``pixel / 127.5 - 1`` (so in ``[-1, 1]``), then
            ``transform`` if set.
        label : torch.Tensor
            ``int64`` scalar; multi-label: ``float32`` ``[L]`` of 0/1 (ready for BCE).
        group : torch.Tensor
            ``int64`` scalar, ``-1`` when unknown.
        """
        # astype copies, so the tensor never aliases (or warns about) the stored array.
        image = torch.from_numpy(self.images[index].astype(np.float32)).permute(2, 0, 1)
        image = image.contiguous().div_(127.5).sub_(1.0)
        if self.transform is not None:
            image = self.transform(image)
        if self.info.is_multi_label:
            label = torch.from_numpy(self.labels[index].astype(np.float32))
        else:
            label = torch.tensor(int(self.labels[index]), dtype=torch.int64)
        group_id = UNKNOWN_GROUP if self.groups is None else int(self.groups[index])
        return image, label, torch.tensor(group_id, dtype=torch.int64)

    def __repr__(self) -> str:
        n, h, w, c = self.images.shape
        groups = "none" if self.groups is None else str(len(np.unique(self.groups)))
        return (
            f"ImageDataset(flag={self.info.flag!r}, task={self.info.task!r}, n={n}, "
            f"image={h}x{w}x{c}, num_classes={self.info.num_classes}, groups={groups})"
        )

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> "ImageDataset":
        """Return a new dataset with the rows ``indices`` (ints or a boolean mask [N]).

        Info and transform are kept; arrays are copied.
        """
        index = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if index.dtype == np.bool_:
            if index.shape != (len(self),):
                raise IndexError(
                    f"A boolean subset mask of ImageDataset '{self.info.flag}' must have shape "
                    f"({len(self)},). Got {tuple(index.shape)} instead."
                )
        elif index.size == 0:
            index = index.astype(np.int64)
        elif not np.issubdtype(index.dtype, np.integer) or index.ndim != 1:
            raise IndexError(
                f"Subset indices of ImageDataset '{self.info.flag}' must be a 1-D sequence of ints "
                f"or a boolean mask. Got {index.dtype} {tuple(index.shape)} instead."
            )
        elif index.min() < -len(self) or index.max() >= len(self):
            raise IndexError(
                f"Subset indices of ImageDataset '{self.info.flag}' must lie in [0, {len(self)}). "
                f"Got values from {index.min()} to {index.max()} instead."
            )
        return ImageDataset(
            self.images[index],
            self.labels[index],
            self.info,
            groups=None if self.groups is None else self.groups[index],
            transform=self.transform,
        )

    def with_transform(self, transform: Transform | None) -> "ImageDataset":
        """Return a dataset sharing these arrays (no copy) with another ``transform``."""
        return ImageDataset(self.images, self.labels, self.info, groups=self.groups, transform=transform)

    def class_counts(self) -> np.ndarray:
        """Return the samples per class, ``int64`` ``[num_classes]``.

        Multi-label: the number of positive samples per label. Handy for class weights
        (e.g. ``counts.sum() / (num_classes * counts)``).
        """
        if self.info.is_multi_label:
            return self.labels.sum(axis=0).astype(np.int64)
        return np.bincount(self.labels, minlength=self.info.num_classes).astype(np.int64)

    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the whole split at once, without ``transform`` (fast evaluation).

        Returns
        -------
        images : torch.Tensor
            ``float32`` ``[N, C, H, W]`` in ``[-1, 1]``.
        labels : torch.Tensor
            ``int64`` ``[N]``; multi-label ``float32`` ``[N, L]``.
        groups : torch.Tensor
            ``int64`` ``[N]``, ``-1`` where unknown.
        """
        images = torch.from_numpy(self.images.astype(np.float32)).permute(0, 3, 1, 2)
        images = images.contiguous().div_(127.5).sub_(1.0)
        dtype = np.float32 if self.info.is_multi_label else np.int64
        labels = torch.from_numpy(self.labels.astype(dtype))
        if self.groups is None:
            groups = torch.full((len(self),), UNKNOWN_GROUP, dtype=torch.int64)
        else:
            groups = torch.from_numpy(self.groups.copy())
        return images, labels, groups


def _check_label_values(labels: np.ndarray, info: DatasetInfo) -> None:
    """Raise LabelRangeError unless every label is a class index of ``info`` (multi-label: 0 or 1)."""
    if not labels.size:
        return
    if info.is_multi_label:
        outside = (labels != 0) & (labels != 1)
        if outside.any():
            count = int(outside.sum())
            raise LabelRangeError(
                f"ImageDataset '{info.flag}' expects multi-label targets of 0 or 1. Got {count} other value(s), "
                f"e.g. {labels[outside].flat[0]}, instead; give each sample one 0/1 target per label.",
                detail=f"{count} multi-label target(s) other than 0 and 1",
            )
        return
    low, high, last = int(labels.min()), int(labels.max()), info.num_classes - 1
    if low < 0 or high > last:
        count = int(((labels < 0) | (labels > last)).sum())
        raise LabelRangeError(
            f"ImageDataset '{info.flag}' expects class indices 0 to {last} ({info.num_classes} classes). Got "
            f"{count} label(s) outside that range (from {low} to {high}) instead; relabel those samples, or "
            "describe the data with a DatasetInfo whose num_classes covers them.",
            detail=f"{count} label(s) outside 0 to {last}",
        )


class TrainAugmentation:
    """Light, label-preserving augmentation of one image tensor ``[C, H, W]``.

    A random horizontal flip, then a random translation by up to ``max_shift`` pixels in
    each direction (pad, then crop back to ``H x W``). Random draws use torch's global
    RNG, which the trainer seeds. No intensity change: image intensities carry diagnostic
    meaning in medical images.

    Parameters
    ----------
    max_shift : int
        Largest shift in pixels (0 disables translation). Must be smaller than H and W
        for reflect padding.
    hflip_p : float, optional
        Probability of a horizontal flip. Set 0 where laterality matters to the label.
    padding_mode : {"reflect", "constant"}, optional
        ``"reflect"`` mirrors the border; ``"constant"`` pads with -1, i.e. black in the
        ``[-1, 1]`` scale.
    """

    def __init__(self, max_shift: int, hflip_p: float = 0.5, padding_mode: str = "reflect") -> None:
        if not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(
                f"The 'max_shift' parameter of TrainAugmentation must be an int >= 0. Got {max_shift!r} instead."
            )
        if not 0.0 <= hflip_p <= 1.0:
            raise ValueError(
                f"The 'hflip_p' parameter of TrainAugmentation must be a float in [0, 1]. Got {hflip_p!r} instead."
            )
        if padding_mode not in ("reflect", "constant"):
            raise ValueError(
                "The 'padding_mode' parameter of TrainAugmentation must be 'reflect' or 'constant'. "
                f"Got {padding_mode!r} instead."
            )
        self.max_shift = max_shift
        self.hflip_p = hflip_p
        self.padding_mode = padding_mode

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Return the augmented ``image`` (``[C, H, W]``, same shape and dtype; never modified in place)."""
        if self.hflip_p > 0 and torch.rand(()) < self.hflip_p:
            image = image.flip(-1)
        shift = self.max_shift
        if shift == 0:
            return image
        height, width = image.shape[-2:]
        pad_kwargs = {"value": -1.0} if self.padding_mode == "constant" else {}
        padded = F.pad(image.unsqueeze(0), (shift, shift, shift, shift), mode=self.padding_mode, **pad_kwargs)
        top, left = torch.randint(0, 2 * shift + 1, (2,)).tolist()
        return padded[0, :, top : top + height, left : left + width]

    def __repr__(self) -> str:
        return (
            f"TrainAugmentation(max_shift={self.max_shift}, hflip_p={self.hflip_p}, "
            f"padding_mode={self.padding_mode!r})"
        )


def default_hflip_p(dataset: str) -> float:
    """Mirroring probability of the training augmentation for ``dataset``:
    0 for :data:`NO_MIRROR_DATASETS`, else 0.5."""
    return 0.0 if dataset in NO_MIRROR_DATASETS else 0.5


def train_augmentation(img_size: int, hflip_p: float = 0.5, padding_mode: str = "reflect") -> TrainAugmentation:
    """Return the default training augmentation for ``img_size`` x ``img_size`` images.

    Horizontal flip with probability ``hflip_p`` and a random translation of up to
    ``img_size // 8`` pixels (3 px at 28 px, 28 px at 224 px), reflect-padded.
    """
    if not isinstance(img_size, int) or img_size < 2:
        raise ValueError(
            f"The 'img_size' parameter of train_augmentation must be an int >= 2. Got {img_size!r} instead."
        )
    return TrainAugmentation(max_shift=img_size // 8, hflip_p=hflip_p, padding_mode=padding_mode)
