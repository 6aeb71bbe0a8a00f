"""The training speed knobs on CPU: the on-device loader's batches and augmentation,
precision, channels-last and compile preparation (the speed itself is measured by
``benchmarks/bench_models.py``, not here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medfed.client.device_loader import DeviceLoader, augment_batch, fits_on_device
from medfed.client.task import (
    AUTO_BFLOAT16_MIN_SIDE, _autocast, make_loader, prepare_model, resolved_precision, train_epoch,
)
from medfed.config import ConfigError, load_config
from medfed.data import DatasetInfo, ImageDataset, TrainAugmentation

GRAY = DatasetInfo(flag="toy", task="multi-class", num_classes=3, in_chans=1)


def _dataset(n: int = 10, size: int = 6, transform=None, groups=None) -> ImageDataset:
    images = np.random.default_rng(0).integers(0, 256, size=(n, size, size, 1)).astype(np.uint8)
    groups = np.arange(n) % 2 if groups is None else groups
    return ImageDataset(images, np.arange(n) % 3, GRAY, groups=groups, transform=transform)


def test_device_loader_without_augmentation_yields_the_dataloaders_batches():
    # Prepare
    dataset = _dataset(n=10)
    # Execute
    ours = list(DeviceLoader(dataset, 4, torch.device("cpu"), shuffle=False))
    reference = list(make_loader(dataset, 4, shuffle=False))
    # Assert: same batch sizes (no drop_last without shuffling), same values and dtypes.
    assert [len(b[0]) for b in ours] == [len(b[0]) for b in reference] == [4, 4, 2]
    for (images, labels, groups), (ref_images, ref_labels, ref_groups) in zip(ours, reference):
        torch.testing.assert_close(images, ref_images)
        assert torch.equal(labels, ref_labels) and torch.equal(groups, ref_groups)


def test_device_loader_shuffles_every_sample_once_per_epoch_and_drops_the_last_partial_batch():
    # Prepare
    dataset = _dataset(n=10, groups=np.arange(10))  # the group is the sample's id here
    loader = DeviceLoader(dataset, 4, torch.device("cpu"), shuffle=True, seed=3)
    # Execute
    first, second = list(loader), list(loader)
    # Assert
    assert len(loader) == 2 and [len(b[1]) for b in first] == [4, 4]
    seen = torch.cat([b[2] for b in first])
    assert len(set(seen.tolist())) == 8 and set(seen.tolist()) <= set(range(10))
    for images, labels, ids in first:  # each image and label is its sample's
        torch.testing.assert_close(images, torch.stack([dataset[i][0] for i in ids.tolist()]))
        assert torch.equal(labels, torch.as_tensor(ids % 3))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, second))  # a new order each epoch
    again = list(DeviceLoader(dataset, 4, torch.device("cpu"), shuffle=True, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # the seed repeats it


@pytest.mark.parametrize("padding_mode", ["reflect", "constant"])
def test_batch_augmentation_applies_each_images_own_flip_and_shift(padding_mode):
    # Prepare: the draws the batch augmentation will make, replayed per image.
    images = torch.randn(5, 2, 6, 7)
    augmentation = TrainAugmentation(max_shift=2, hflip_p=0.5, padding_mode=padding_mode)
    replay = torch.Generator().manual_seed(11)
    flips = torch.rand(5, generator=replay) < 0.5
    offsets = torch.randint(0, 5, (5, 2), generator=replay)
    expected = []
    for image, flip, (top, left) in zip(images, flips, offsets.tolist()):
        image = image.flip(-1) if flip else image
        pad = {"value": -1.0} if padding_mode == "constant" else {}
        padded = F.pad(image[None], (2, 2, 2, 2), mode=padding_mode, **pad)[0]
        expected.append(padded[:, top:top + 6, left:left + 7])
    # Execute
    out = augment_batch(images, augmentation, torch.Generator().manual_seed(11))
    # Assert
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=0)
    assert flips.any() and not flips.all()  # the seed exercises both branches


def test_cpu_training_never_moves_data_to_the_device_loader():
    dataset = _dataset()
    assert not fits_on_device(dataset, torch.device("cpu"))
    loader = make_loader(dataset, 4, shuffle=True, device=torch.device("cpu"), on_device=True)
    assert isinstance(loader, torch.utils.data.DataLoader)


def _train_once(**knobs) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    model = prepare_model(model, torch.device("cpu"), channels_last=knobs.get("channels_last", False))
    loader = make_loader(_dataset(n=8), 8, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fit = train_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, task="multi-class",
                      device=torch.device("cpu"), **knobs)
    return fit["loss"], model[0].weight.detach().clone()


def test_channels_last_and_bfloat16_train_like_float32():
    # Execute
    loss, weight = _train_once()
    cl_loss, cl_weight = _train_once(channels_last=True)
    bf_loss, bf_weight = _train_once(precision="bfloat16")
    # Assert
    assert cl_loss == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(cl_weight, weight, rtol=1e-5, atol=1e-6)
    assert bf_loss == pytest.approx(loss, rel=2e-2) and bf_loss != loss  # autocast did run in bfloat16
    torch.testing.assert_close(bf_weight, weight, rtol=0, atol=2e-2)


def test_prepare_model_compiles_in_place_once_and_keeps_the_state_dict_keys():
    # Prepare
    model = nn.Sequential(nn.Linear(2, 2))
    keys = list(model.state_dict())
    # Execute (compilation itself is lazy: nothing runs here)
    prepared = prepare_model(model, torch.device("cpu"), compile=True)
    compiled_call = prepared._compiled_call_impl
    again = prepare_model(prepared, torch.device("cpu"), compile=True)
    # Assert
    assert prepared is model and again is model
    assert compiled_call is not None and again._compiled_call_impl is compiled_call
    assert list(again.state_dict()) == keys


def test_speed_knobs_in_the_config():
    cfg = load_config()
    assert (cfg.train.precision, cfg.train.channels_last, cfg.train.compile, cfg.train.data_on_device) == (
        "auto", False, False, True)
    assert load_config(overrides=["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="'train.precision' must be one of 'auto', 'float32', 'bfloat16'"):
        load_config(overrides=["train.precision=fp16"])


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the rule is checked without a GPU
def test_auto_precision_autocasts_to_bfloat16_only_on_cuda_and_only_for_large_images(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H200
    # Execute: what "auto" picks per device and image side (MedMNIST's 28/64/128/224 px)
    def picks(device: str, side: int, precision: str = "auto") -> torch.dtype:
        context = _autocast(torch.device(device), precision, side)
        return context.fast_dtype if isinstance(context, torch.autocast) else torch.float32

    # Assert: measured faster on an H200 at 224 px, slower at 28 and 64 px (docs/performance.md)
    assert AUTO_BFLOAT16_MIN_SIDE == 224
    assert [picks("cuda", side) for side in (28, 64, 128, 224, 512)] == [torch.float32] * 3 + [torch.bfloat16] * 2
    assert picks("cpu", 224) == torch.float32
    assert resolved_precision(torch.device("cuda"), "auto", 28) == "float32"
    assert resolved_precision(torch.device("cuda"), "auto", 224) == "bfloat16"
    assert picks("cuda", 28, "bfloat16") == torch.bfloat16 and picks("cuda", 224, "float32") == torch.float32
    with pytest.raises(ValueError, match="Unknown precision 'fp16'"):
        _autocast(torch.device("cpu"), "fp16", 28)
    # A GPU before Ampere (a T4: 7.5) emulates bfloat16, slower than float32: auto keeps float32.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert picks("cuda", 224) == torch.float32 and picks("cuda", 224, "bfloat16") == torch.bfloat16


def test_the_device_loader_is_chosen_by_the_gpus_size_not_by_its_momentary_free_memory(monkeypatch):
    # Free memory moves with what earlier sites left cached; the two loaders draw different
    # augmentations, so the choice must not depend on it.
    from types import SimpleNamespace

    dataset = _dataset(n=16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))  # nothing free right now
    for total, fits in ((16 * dataset.images.nbytes, True), (16 * dataset.images.nbytes - 1, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, t=total: SimpleNamespace(total_memory=t))
        assert fits_on_device(dataset, torch.device("cuda")) is fits
