"""ImageDataset and the training augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfed.data import DatasetInfo, DatasetValidationError, ImageDataset, TrainAugmentation, train_augmentation

GRAY = DatasetInfo(flag="toy", task="multi-class", num_classes=3, in_chans=1,
                   label_names={"0": "a", "1": "b", "2": "c"})
RGB = DatasetInfo(flag="toy-rgb", task="binary-class", num_classes=2, in_chans=3)
MULTI = DatasetInfo(flag="toy-ml", task="multi-label, binary-class", num_classes=2, in_chans=1)


def _gray_dataset(n=5, transform=None, groups=None):
    images = np.arange(n * 4 * 4, dtype=np.int64).reshape(n, 4, 4) % 256
    return ImageDataset(images.astype(np.uint8), np.arange(n) % 3, GRAY, groups=groups, transform=transform)


def test_getitem_scales_pixels_to_minus_one_one_and_moves_channels_first():
    # Prepare: one RGB image holding 0, 255 and 51 in known places
    images = np.zeros((1, 2, 3, 3), dtype=np.uint8)
    images[0, 0, 0, 0] = 255
    images[0, 1, 2, 2] = 51
    dataset = ImageDataset(images, np.array([[1]]), RGB)
    # Execute
    image, label, group = dataset[0]
    # Assert: [C, H, W], x / 127.5 - 1
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 2, 3)
    assert image[0, 0, 0].item() == pytest.approx(1.0)
    assert image[2, 1, 2].item() == pytest.approx(51 / 127.5 - 1)  # -0.6
    assert image[1, 0, 0].item() == pytest.approx(-1.0)
    assert label.dtype == torch.int64 and label.shape == () and label.item() == 1
    assert group.dtype == torch.int64 and group.item() == -1


def test_getitem_returns_group_and_multi_label_float_targets():
    # Prepare
    dataset = ImageDataset(np.zeros((2, 4, 4), np.uint8), np.array([[0, 1], [1, 1]]), MULTI, groups=np.array([3, 7]))
    # Execute
    _, label, group = dataset[1]
    # Assert
    assert label.dtype == torch.float32 and label.tolist() == [1.0, 1.0]
    assert group.item() == 7


def test_transform_is_applied_to_the_scaled_tensor():
    dataset = _gray_dataset(transform=lambda x: x * 0 + x.min())
    image, _, _ = dataset[0]
    assert torch.all(image == -1.0)  # pixel 0 of image 0 scales to -1


def test_subset_selects_rows_and_keeps_info_transform_and_groups():
    # Prepare
    transform = torch.nn.Identity()
    dataset = _gray_dataset(transform=transform, groups=np.array([0, 1, 0, 1, 2]))
    # Execute
    part = dataset.subset([4, 1])
    masked = dataset.subset(np.array([True, False, True, False, False]))
    # Assert
    np.testing.assert_array_equal(part.images, dataset.images[[4, 1]])
    assert part.labels.tolist() == [1, 1] and part.groups.tolist() == [2, 1]
    assert part.info is dataset.info and part.transform is transform
    assert len(masked) == 2 and masked.labels.tolist() == [0, 2]
    assert len(dataset.subset([])) == 0


@pytest.mark.parametrize("indices", [[5], [0, 1.5], np.array([True, False])])
def test_subset_rejects_bad_indices(indices):
    with pytest.raises(IndexError):
        _gray_dataset().subset(indices)


def test_with_transform_shares_arrays():
    dataset = _gray_dataset()
    other = dataset.with_transform(torch.neg)
    assert other.transform is torch.neg and dataset.transform is None
    assert np.shares_memory(other.images, dataset.images)


def test_class_counts_for_classes_and_labels():
    # Prepare: labels 0,1,2,0,1 over 3 classes; multi-label positives per column
    multi = ImageDataset(np.zeros((3, 2, 2), np.uint8), np.array([[1, 0], [1, 1], [0, 0]]), MULTI)
    # Execute / Assert
    assert _gray_dataset().class_counts().tolist() == [2, 2, 1]
    assert multi.class_counts().tolist() == [2, 1]


def test_to_tensors_equals_stacked_items():
    dataset = _gray_dataset(groups=np.array([0, 1, 0, 1, -1]))
    images, labels, groups = dataset.to_tensors()
    items = [dataset[i] for i in range(len(dataset))]
    torch.testing.assert_close(images, torch.stack([item[0] for item in items]))
    assert labels.tolist() == [item[1].item() for item in items]
    assert groups.tolist() == [0, 1, 0, 1, -1]


@pytest.mark.parametrize(
    ("images", "labels", "fragment"),
    [(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64), "uint8 images [N, H, W, 1]"),
     (np.zeros((2, 4, 4), np.float32), np.zeros(2, np.int64), "Got float32"),
     (np.zeros((2, 4, 4), np.uint8), np.zeros(3, np.int64), "shape (2,)")],
)
def test_constructor_rejects_inconsistent_arrays(images, labels, fragment):
    with pytest.raises(DatasetValidationError) as caught:
        ImageDataset(images, labels, GRAY)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("labels", "info", "fragment"),
    [(np.array([0, 7]), RGB, "expects class indices 0 to 1 (2 classes). Got 1 label(s) outside that range (from 0 to 7)"),
     (np.array([[-1], [1]]), RGB, "Got 1 label(s) outside that range (from -1 to 1)"),
     (np.array([0, 3, 3]), GRAY, "expects class indices 0 to 2 (3 classes). Got 2 label(s)"),
     (np.array([[0, 2], [1, 1]]), MULTI, "expects multi-label targets of 0 or 1. Got 1 other value(s), e.g. 2,")],
)
def test_constructor_rejects_labels_outside_the_classes(labels, info, fragment):
    # A label 7 with 2 classes was accepted (class_counts then had 8 entries); -1 raised
    # numpy's bare "ValueError: 'list' argument must have no negative elements" in class_counts.
    from medfed.data.errors import LabelRangeError

    images = np.zeros((len(labels), 2, 2, info.in_chans), np.uint8)
    with pytest.raises(LabelRangeError) as caught:
        ImageDataset(images, labels, info)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value) and isinstance(caught.value, DatasetValidationError)
    # What a site may tell a server: how many, never a value.
    assert caught.value.detail.startswith(fragment.split("Got ")[1].split()[0] + " ")


def test_constructor_accepts_every_class_and_boolean_multi_label_targets():
    assert ImageDataset(np.zeros((3, 2, 2), np.uint8), np.array([0, 1, 2]), GRAY).class_counts().tolist() == [1, 1, 1]
    multi = ImageDataset(np.zeros((2, 2, 2), np.uint8), np.array([[True, False], [True, True]]), MULTI)
    assert multi.class_counts().tolist() == [2, 1]


# --- augmentation ------------------------------------------------------------------------


def _crops(image: torch.Tensor, shift: int, mode: str) -> list[torch.Tensor]:
    """Every translation TrainAugmentation may produce (no flip)."""
    height, width = image.shape[-2:]
    kwargs = {"value": -1.0} if mode == "constant" else {}
    padded = F.pad(image.unsqueeze(0), (shift,) * 4, mode=mode, **kwargs)[0]
    return [padded[:, t : t + height, l : l + width] for t in range(2 * shift + 1) for l in range(2 * shift + 1)]


def test_train_augmentation_shift_scales_with_image_size():
    assert train_augmentation(28).max_shift == 3
    assert train_augmentation(224).max_shift == 28


def test_flip_only_augmentation_flips_width():
    image = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    out = TrainAugmentation(max_shift=0, hflip_p=1.0)(image)
    torch.testing.assert_close(out, image.flip(-1))


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_augmentation_output_is_a_translated_possibly_flipped_image(mode):
    # Prepare
    torch.manual_seed(0)
    image = torch.rand(3, 28, 28) * 2 - 1
    augment = TrainAugmentation(max_shift=3, padding_mode=mode)
    candidates = _crops(image, 3, mode) + _crops(image.flip(-1), 3, mode)
    # Execute
    outputs = [augment(image) for _ in range(40)]
    # Assert: same shape, always one of the allowed crops, and the draws vary
    hits = set()
    for out in outputs:
        assert out.shape == image.shape
        matches = [i for i, crop in enumerate(candidates) if torch.equal(out, crop)]
        assert matches, "output is not a translation/flip of the input"
        hits.add(matches[0])
    assert len(hits) > 5
    assert any(h < 49 for h in hits) and any(h >= 49 for h in hits)  # both flipped and not


def test_augmentation_is_reproducible_under_torch_seed():
    image = torch.rand(1, 28, 28)
    augment = train_augmentation(28)
    torch.manual_seed(123)
    first = [augment(image) for _ in range(5)]
    torch.manual_seed(123)
    second = [augment(image) for _ in range(5)]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"max_shift": -1}, "'max_shift'"), ({"max_shift": 1, "hflip_p": 1.5}, "'hflip_p'"),
     ({"max_shift": 1, "padding_mode": "wrap"}, "'padding_mode'")],
)
def test_augmentation_rejects_bad_parameters(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainAugmentation(**kwargs)
