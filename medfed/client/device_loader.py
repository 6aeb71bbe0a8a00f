"""A training loader that keeps a whole split on the GPU and augments there.

A MedMNIST split at 28 px is a few MB (PneumoniaMNIST's 4,708 training images: 3.7 MB as
uint8), so on a GPU the per-sample path (NumPy -> tensor -> augmentation -> collate ->
copy, on one CPU core per site) is what limits training, not the model. The loader
copies the split once, as uint8, to the device and yields the batches a
:class:`torch.utils.data.DataLoader` would (same sizes, same ``drop_last`` rule), each
scaled to ``[-1, 1]`` and augmented as a batch with the same augmentation
(:class:`medfed.data.TrainAugmentation`: flip, then a reflect- or constant-padded shift).
The random draws come from a CPU generator seeded with ``seed``, so a loader repeats
exactly; they differ from the per-sample path's draws, so a site's results on the two
paths differ as two seeds do.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from medfed.data import ImageDataset, TrainAugmentation

__all__ = ["DeviceLoader", "fits_on_device"]

#: Share of the device's total memory the uint8 copy may take. Total, not free: free
#: memory moves with what earlier sites left cached and with other processes on the GPU,
#: and the two loaders draw different augmentations, so a choice made on it could give a
#: site other weights from run to run (or in a resume).
MAX_MEMORY_FRACTION = 1 / 16


def fits_on_device(dataset: ImageDataset, device: torch.device) -> bool:
    """Whether ``dataset`` can move to ``device``: a CUDA device with room to spare, and no
    transform other than :class:`~medfed.data.TrainAugmentation`."""
    if device.type != "cuda" or not isinstance(dataset, ImageDataset):
        return False
    if dataset.transform is not None and not isinstance(dataset.transform, TrainAugmentation):
        return False
    return dataset.images.nbytes <= MAX_MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory


def augment_batch(images: torch.Tensor, augmentation: TrainAugmentation, generator: torch.Generator) -> torch.Tensor:
    """:class:`TrainAugmentation` applied to each image of ``images`` ``[B, C, H, W]``.

    Parameters
    ----------
    images : Tensor
        ``float32`` ``[B, C, H, W]`` in ``[-1, 1]``, on any device.
    augmentation : TrainAugmentation
        Its ``hflip_p``, ``max_shift`` and ``padding_mode``.
    generator : torch.Generator
        CPU generator of the random draws.

    Returns
    -------
    Tensor
        ``[B, C, H, W]``, a new tensor.
    """
    batch, _, height, width = images.shape
    flip = (torch.rand(batch, generator=generator) < augmentation.hflip_p).to(images.device)
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    shift = augmentation.max_shift
    if shift == 0:
        return images
    offsets = torch.randint(0, 2 * shift + 1, (batch, 2), generator=generator).to(images.device)
    pad_kwargs = {"value": -1.0} if augmentation.padding_mode == "constant" else {}
    padded = F.pad(images, (shift, shift, shift, shift), mode=augmentation.padding_mode, **pad_kwargs)
    rows = offsets[:, :1] + torch.arange(height, device=images.device)  # [B, H]
    cols = offsets[:, 1:] + torch.arange(width, device=images.device)  # [B, W]
    index = torch.arange(batch, device=images.device)[:, None, None]
    # [B, H, W, C] from advanced indexing over (sample, row, column), back to [B, C, H, W].
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


class DeviceLoader:
    """Batches ``(images, labels, groups)`` of a split held on ``device``.

    Parameters
    ----------
    dataset : ImageDataset
        The split; its ``transform`` (None or a :class:`TrainAugmentation`) is applied per batch.
    batch_size : int
        Images per batch.
    device : torch.device
        Where the split lives and the batches are made.
    shuffle : bool
        Draw a new order every epoch (and drop the last incomplete batch, as
        :func:`medfed.client.task.make_loader` does, when the split holds more than one batch).
    seed : int
        Seed of the order and the augmentation.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, device: torch.device, *, shuffle: bool,
                 seed: int = 0) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(dataset.images)).to(device).permute(0, 3, 1, 2)
        labels_dtype = torch.float32 if dataset.info.is_multi_label else torch.int64
        self.labels = torch.from_numpy(np.asarray(dataset.labels)).to(labels_dtype)
        groups = dataset.groups if dataset.groups is not None else np.full(len(dataset), -1)
        self.groups = torch.from_numpy(np.asarray(groups, dtype=np.int64))
        self.augmentation = dataset.transform
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.drop_last = shuffle and len(dataset) > batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = self.images.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images[index.to(self.device)].float().div_(127.5).sub_(1.0)
            if self.augmentation is not None:
                images = augment_batch(images, self.augmentation, self.generator)
            # Labels and groups stay on the CPU, as the DataLoader's do (metrics are computed there).
            yield images, self.labels[index], self.groups[index]
