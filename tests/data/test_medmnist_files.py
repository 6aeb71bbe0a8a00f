"""Loading and validation of MedMNIST .npz files (tiny files written in tmp_path)."""

from __future__ import annotations

import hashlib
import io
import urllib.error
import warnings

import numpy as np
import pytest
import torch

import medfed.data.medmnist_files as medmnist_files
from medfed.data import (
    DatasetNotFoundError,
    DatasetValidationError,
    ImageDataset,
    default_data_root,
    load_medmnist,
)
from medfed.data.errors import DatasetSizeWarning

# Tiny files never have the official counts; the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore::medfed.data.errors.DatasetSizeWarning")

BREAST_URL = "https://zenodo.org/records/10519652/files/breastmnist.npz?download=1"


# --- loading -----------------------------------------------------------------------------


def test_loads_one_channel_binary_file(tmp_path, make_arrays, write_npz):
    # Prepare
    arrays = make_arrays(counts=(6, 2, 3), channels=1, num_classes=2)
    write_npz(tmp_path / "breastmnist.npz", arrays)
    # Execute
    datasets = load_medmnist("breastmnist", root=tmp_path)
    # Assert
    assert list(datasets) == ["train", "val", "test"]
    train = datasets["train"]
    assert isinstance(train, ImageDataset)
    assert train.images.shape == (6, 28, 28, 1) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(train.labels, arrays["train_labels"][:, 0])
    assert train.labels.dtype == np.int64 and train.groups is None
    assert (train.info.task, train.info.num_classes, train.info.in_chans) == ("binary-class", 2, 1)
    assert [len(datasets[s]) for s in ("train", "val", "test")] == [6, 2, 3]


def test_loads_three_channel_file_at_size_64(tmp_path, make_arrays, write_npz):
    # Prepare: dermamnist has 3 channels and 7 classes; 64 px files are named {flag}_64.npz.
    arrays = make_arrays(counts=(4, 2, 2), size=64, channels=3, num_classes=7)
    write_npz(tmp_path / "dermamnist_64.npz", arrays)
    # Execute
    test = load_medmnist("dermamnist", root=tmp_path, size=64)["test"]
    # Assert
    assert test.images.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(test.images, arrays["test_images"])
    assert (test.info.num_classes, test.info.in_chans) == (7, 3)


def test_loads_multi_label_file(tmp_path, make_arrays, write_npz):
    # Prepare: chestmnist has 14 labels
    arrays = make_arrays(counts=(5, 2, 2), num_labels=14)
    write_npz(tmp_path / "chestmnist.npz", arrays)
    # Execute
    train = load_medmnist("chestmnist", root=tmp_path)["train"]
    # Assert
    assert train.labels.shape == (5, 14) and train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.labels, arrays["train_labels"])
    image, label, group = train[0]
    assert label.dtype == torch.float32 and tuple(label.shape) == (14,)
    np.testing.assert_array_equal(label.numpy(), arrays["train_labels"][0])


def test_ordinal_regression_is_loaded_as_classes(tmp_path, make_arrays, write_npz):
    # Prepare: retinamnist, 5 grades, 3 channels; labels stored flat (N,)
    arrays = make_arrays(counts=(5, 2, 2), channels=3, num_classes=5)
    arrays["train_labels"] = arrays["train_labels"][:, 0]
    write_npz(tmp_path / "retinamnist.npz", arrays)
    # Execute
    train = load_medmnist("retinamnist", root=tmp_path)["train"]
    # Assert
    assert train.info.task == "ordinal-regression" and train.info.num_classes == 5
    np.testing.assert_array_equal(train.labels, arrays["train_labels"])


def test_embedded_default_loads_with_root_none():
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetSizeWarning)  # the embedded file has the official counts
        datasets = load_medmnist("breastmnist")
    # Assert
    assert (default_data_root() / "breastmnist.npz").is_file()
    assert [len(datasets[s]) for s in ("train", "val", "test")] == [546, 78, 156]
    assert datasets["train"].class_counts().tolist() == [147, 399]


# --- the count-differs warning ---------------------------------------------------------------


def test_counts_differing_from_official_warn_once_naming_both(tmp_path, make_arrays, write_npz):
    # Prepare
    write_npz(tmp_path / "breastmnist.npz", make_arrays(counts=(6, 2, 3)))
    # Execute
    with pytest.warns(DatasetSizeWarning) as record:
        load_medmnist("breastmnist", root=tmp_path)
    # Assert
    size_warnings = [w for w in record if issubclass(w.category, DatasetSizeWarning)]
    assert len(size_warnings) == 1
    message = str(size_warnings[0].message)
    assert "6/2/3" in message and "546/78/156" in message and "breastmnist.npz" in message


# --- validation failures ---------------------------------------------------------------------


def _expect_invalid(tmp_path, flag, arrays, write_npz, *fragments, size=28):
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    write_npz(tmp_path / name, arrays)
    with pytest.raises(DatasetValidationError) as caught:
        load_medmnist(flag, root=tmp_path, size=size)
    message = str(caught.value)
    assert name in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_key_is_named(tmp_path, make_arrays, write_npz):
    arrays = make_arrays()
    del arrays["val_labels"]
    _expect_invalid(tmp_path, "breastmnist", arrays, write_npz, "lacks keys ['val_labels']", "found")


def test_wrong_image_dtype_is_named(tmp_path, make_arrays, write_npz):
    arrays = make_arrays()
    arrays["train_images"] = arrays["train_images"].astype(np.float32)
    _expect_invalid(tmp_path, "breastmnist", arrays, write_npz, "'train_images'", "uint8", "float32")


def test_grayscale_images_for_rgb_dataset_are_rejected(tmp_path, make_arrays, write_npz):
    arrays = make_arrays(channels=1, num_classes=8)  # bloodmnist has 3 channels
    _expect_invalid(tmp_path, "bloodmnist", arrays, write_npz, "(N, 28, 28, 3)", "3 channel", "(6, 28, 28)")


def test_rgb_images_for_grayscale_dataset_are_rejected(tmp_path, make_arrays, write_npz):
    arrays = make_arrays(channels=3)
    _expect_invalid(tmp_path, "breastmnist", arrays, write_npz, "(N, 28, 28)", "(6, 28, 28, 3)")


def test_wrong_size_is_named_with_the_file_name_of_that_size(tmp_path, make_arrays, write_npz):
    # Prepare: a 28 px file saved under the 64 px name
    arrays = make_arrays(size=28)
    # Execute / Assert
    _expect_invalid(tmp_path, "breastmnist", arrays, write_npz, "64x64", "Got 28x28", "breastmnist.npz", size=64)


def test_label_out_of_range_is_named(tmp_path, make_arrays, write_npz):
    arrays = make_arrays(num_classes=2)
    arrays["test_labels"][1, 0] = 2
    _expect_invalid(tmp_path, "breastmnist", arrays, write_npz, "'test_labels'", "[0, 1]", "from 0 to 2")


def test_float_labels_are_rejected(tmp_path, make_arrays, write_npz):
    arrays = make_arrays()
    arrays["val_labels"] = arrays["val_labels"].astype(np.float64)
    _expect_invalid(tmp_path, "breastmnist", arrays, write_npz, "'val_labels'", "integer", "float64")


def test_label_shape_is_checked(tmp_path, make_arrays, write_npz):
    arrays = make_arrays()
    arrays["train_labels"] = np.zeros((6, 2), dtype=np.uint8)
    _expect_invalid(tmp_path, "breastmnist", arrays, write_npz, "(N, 1) or (N,)", "(6, 2)")


def test_image_and_label_counts_must_match(tmp_path, make_arrays, write_npz):
    arrays = make_arrays()
    arrays["train_labels"] = arrays["train_labels"][:5]
    _expect_invalid(tmp_path, "breastmnist", arrays, write_npz, "'train_labels'", "6 images", "Got 5 labels")


def test_multi_label_values_must_be_zero_or_one(tmp_path, make_arrays, write_npz):
    arrays = make_arrays(num_labels=14)
    arrays["train_labels"][0, 3] = 2
    _expect_invalid(tmp_path, "chestmnist", arrays, write_npz, "only 0 and 1", "e.g. 2")


def test_multi_label_width_must_match_label_count(tmp_path, make_arrays, write_npz):
    arrays = make_arrays(num_labels=13)
    _expect_invalid(tmp_path, "chestmnist", arrays, write_npz, "(N, 14)", "(6, 13)")


def test_corrupt_file_is_named(tmp_path):
    # Prepare: bytes that are no archive at all
    (tmp_path / "breastmnist.npz").write_bytes(b"this is not a zip archive" * 10)
    # Execute
    with pytest.raises(DatasetValidationError) as caught:
        load_medmnist("breastmnist", root=tmp_path)
    # Assert
    assert "breastmnist.npz" in str(caught.value) and "not a readable .npz" in str(caught.value)
    assert BREAST_URL in str(caught.value)
    assert "neither an .npz nor an .npy file" in str(caught.value)
    assert "allow_pickle" not in str(caught.value)  # NumPy's advice to load it unsafely is not passed on


def test_truncated_file_is_named(tmp_path, make_arrays, write_npz):
    # Prepare: the first half of a valid archive
    full = write_npz(tmp_path / "full.npz", make_arrays()).read_bytes()
    (tmp_path / "breastmnist.npz").write_bytes(full[: len(full) // 2])
    # Execute
    with pytest.raises(DatasetValidationError) as caught:
        load_medmnist("breastmnist", root=tmp_path)
    # Assert
    assert "breastmnist.npz" in str(caught.value) and "truncated or corrupt" in str(caught.value)


def test_single_npy_array_is_rejected(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "x.npy").rename(tmp_path / "breastmnist.npz")
    with pytest.raises(DatasetValidationError, match="single .npy array"):
        load_medmnist("breastmnist", root=tmp_path)


@pytest.mark.parametrize(
    ("flag", "size", "fragment"),
    [("notamnist", 28, "Unknown MedMNIST 2D dataset 'notamnist'"),
     ("organmnist3d", 28, "3D datasets are not supported"),
     ("breastmnist", 32, "must be one of [28, 64, 128, 224]. Got 32")],
)
def test_unknown_flag_or_size_is_a_value_error(tmp_path, flag, size, fragment):
    with pytest.raises(ValueError) as caught:
        load_medmnist(flag, root=tmp_path, size=size)
    assert fragment in str(caught.value)


# --- missing files and downloads (never the real network) ---------------------------------------


def test_missing_file_with_failing_download_names_path_and_url(tmp_path, monkeypatch):
    # Prepare: the default downloader, whose network call fails
    def unreachable(url, timeout_s):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(medmnist_files, "_open_url", unreachable)
    # Execute
    with pytest.raises(DatasetNotFoundError) as caught:
        load_medmnist("breastmnist", root=tmp_path, size=64)
    # Assert
    message = str(caught.value)
    assert str(tmp_path / "breastmnist_64.npz") in message
    assert "https://zenodo.org/records/10519652/files/breastmnist_64.npz?download=1" in message
    assert "Name or service not known" in message and "save it as" in message
    assert isinstance(caught.value, FileNotFoundError)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_injected_downloader_failure_becomes_not_found(tmp_path):
    def failing(url, destination):
        raise TimeoutError("timed out")

    with pytest.raises(DatasetNotFoundError) as caught:
        load_medmnist("pneumoniamnist", root=tmp_path, downloader=failing)
    assert str(tmp_path / "pneumoniamnist.npz") in str(caught.value)
    assert "pneumoniamnist.npz?download=1" in str(caught.value) and "timed out" in str(caught.value)


def test_missing_file_is_downloaded_to_root_then_validated(tmp_path, make_arrays, write_npz):
    # Prepare: a downloader that "downloads" a tiny valid file
    calls = []

    def fake_download(url, destination):
        calls.append((url, destination))
        write_npz(destination, make_arrays(counts=(3, 1, 1)))

    root = tmp_path / "new_root"
    # Execute
    datasets = load_medmnist("breastmnist", root=root, downloader=fake_download)
    # Assert
    assert calls == [(BREAST_URL, root / "breastmnist.npz")]
    assert len(datasets["train"]) == 3


def test_failed_download_does_not_leave_a_mistyped_root_folder(tmp_path):
    # Prepare: a root that does not exist (a typo), and no network
    def failing(url, destination):
        assert destination.parent.is_dir()  # the downloader still gets a folder to write to
        raise urllib.error.URLError("Name or service not known")

    root = tmp_path / "medmnsit" / "data"
    # Execute
    with pytest.raises(DatasetNotFoundError) as caught:
        load_medmnist("breastmnist", root=root, downloader=failing)
    # Assert
    assert list(tmp_path.iterdir()) == []
    assert f"{root} did not exist: check the data root's spelling" in str(caught.value)


def test_data_root_that_is_the_file_itself_says_to_pass_its_folder(tmp_path, make_arrays, write_npz):
    # Prepare: --data-root .../breastmnist.npz instead of its folder
    file = tmp_path / "breastmnist.npz"
    write_npz(file, make_arrays(counts=(3, 1, 1)))

    def must_not_run(url, destination):
        raise AssertionError(f"downloader called with {destination}")

    # Execute
    with pytest.raises(DatasetNotFoundError) as caught:
        load_medmnist("breastmnist", root=file, downloader=must_not_run)
    # Assert
    message = str(caught.value)
    assert f"The data root {file} is a file" in message
    assert "must be the folder holding breastmnist.npz, not the file itself" in message
    assert f"pass {tmp_path}." in message and "breastmnist.npz/breastmnist.npz" not in message


def test_download_disabled_raises_with_path_and_url(tmp_path):
    def must_not_run(url, destination):
        raise AssertionError("downloader called although download=False")

    with pytest.raises(DatasetNotFoundError) as caught:
        load_medmnist("breastmnist", root=tmp_path, download=False, downloader=must_not_run)
    assert str(tmp_path / "breastmnist.npz") in str(caught.value) and BREAST_URL in str(caught.value)


def test_non_embedded_flag_without_root_names_url_and_root_argument():
    with pytest.raises(DatasetNotFoundError) as caught:
        load_medmnist("pneumoniamnist")
    message = str(caught.value)
    assert "not embedded" in message and "root=" in message
    assert "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1" in message


class _FakeResponse(io.BytesIO):
    pass


def test_download_file_writes_atomically_and_checks_md5(tmp_path, monkeypatch):
    # Prepare
    payload = b"0123456789" * 1000
    monkeypatch.setattr(medmnist_files, "_open_url", lambda url, timeout_s: _FakeResponse(payload))
    destination = tmp_path / "sub" / "file.npz"
    # Execute
    medmnist_files.download_file("https://example.invalid/f", destination,
                                 expected_md5=hashlib.md5(payload).hexdigest())
    # Assert
    assert destination.read_bytes() == payload
    assert [p.name for p in destination.parent.iterdir()] == ["file.npz"]


def test_download_file_discards_bytes_with_wrong_md5(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setattr(medmnist_files, "_open_url", lambda url, timeout_s: _FakeResponse(b"corrupted"))
    # Execute
    with pytest.raises(DatasetValidationError) as caught:
        medmnist_files.download_file("https://example.invalid/f", tmp_path / "file.npz", expected_md5="0" * 32)
    # Assert
    assert "MD5" in str(caught.value) and "0" * 32 in str(caught.value)
    assert list(tmp_path.iterdir()) == []


# --- the real shared files ----------------------------------------------------------------------


def test_shared_breastmnist_loads_with_official_counts(shared_data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetSizeWarning)
        datasets = load_medmnist("breastmnist", root=shared_data_dir)
    assert [len(datasets[s]) for s in ("train", "val", "test")] == [546, 78, 156]
    assert datasets["train"].class_counts().tolist() == [147, 399]


def test_shared_pneumoniamnist_subset_loads_with_one_warning(shared_data_dir):
    with pytest.warns(DatasetSizeWarning) as record:
        datasets = load_medmnist("pneumoniamnist", root=shared_data_dir)
    assert len([w for w in record if issubclass(w.category, DatasetSizeWarning)]) == 1
    assert "3882/524/624" in str(record[0].message) and "4708/524/624" in str(record[0].message)
    assert [len(datasets[s]) for s in ("train", "val", "test")] == [3882, 524, 624]
    assert datasets["train"].class_counts().tolist() == [388, 3494]
    image, label, group = datasets["test"][0]
    assert tuple(image.shape) == (1, 28, 28) and -1.0 <= float(image.min()) <= float(image.max()) <= 1.0



def test_an_archive_of_python_objects_and_a_folder_for_a_file_are_said_as_they_are(tmp_path):
    # Both were called "not a readable .npz archive ... truncated or corrupt" / "not found".
    arrays = {f"{split}_images": np.zeros((2, 28, 28), np.uint8) for split in ("train", "val", "test")}
    arrays.update({f"{split}_labels": np.zeros((2, 1), np.uint8) for split in ("train", "val", "test")})
    arrays["train_labels"] = np.array([[1], ["x"]], dtype=object)
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(DatasetValidationError, match=r"holds Python objects in \['train_labels'\], which are never "
                                                     r"unpickled; save its arrays as numbers"):
        load_medmnist("breastmnist", tmp_path, download=False)
    folder = tmp_path / "other"
    (folder / "breastmnist.npz").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"breastmnist.npz is a folder; put the .npz file there instead"):
        load_medmnist("breastmnist", folder, download=False)
