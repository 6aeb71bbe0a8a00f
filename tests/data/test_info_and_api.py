"""Dataset metadata, the public API and the import rules of medfed.data."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import medfed.data
from medfed.data import DatasetInfo, dataset_info
from medfed.data.info import MEDMNIST_2D_FLAGS, normalize_task


@pytest.mark.parametrize(
    ("flag", "task", "num_classes", "in_chans"),
    [("breastmnist", "binary-class", 2, 1), ("chestmnist", "multi-label, binary-class", 14, 1),
     ("retinamnist", "ordinal-regression", 5, 3), ("pathmnist", "multi-class", 9, 3),
     ("organsmnist", "multi-class", 11, 1), ("tissuemnist", "multi-class", 8, 1)],
)
def test_dataset_info_from_medmnist(flag, task, num_classes, in_chans):
    info = dataset_info(flag)
    assert (info.flag, info.task, info.num_classes, info.in_chans) == (flag, task, num_classes, in_chans)
    assert len(info.label_names) == num_classes
    assert info.is_multi_label == (task == "multi-label, binary-class")


def test_every_2d_flag_has_info_and_dataset_info_is_frozen():
    assert len(MEDMNIST_2D_FLAGS) == 12
    infos = [dataset_info(flag) for flag in MEDMNIST_2D_FLAGS]
    with pytest.raises(dataclasses.FrozenInstanceError):
        infos[0].num_classes = 3  # type: ignore[misc]
    assert all(isinstance(info, DatasetInfo) for info in infos)


def test_task_aliases():
    assert normalize_task("multi-label") == "multi-label, binary-class"
    assert normalize_task("binary") == "binary-class"
    with pytest.raises(ValueError, match="Got 'segmentation'"):
        normalize_task("segmentation")


def test_public_api_is_exported():
    expected = {
        "DatasetInfo", "ImageDataset", "load_medmnist", "load_site_folder", "classification_metrics", "confusion",
        "group_metrics", "equity_scaled", "train_augmentation", "DatasetNotFoundError", "DatasetValidationError",
        "default_data_root", "dataset_info", "medmnist_filename", "medmnist_url",
    }
    assert expected <= set(medfed.data.__all__)
    assert all(hasattr(medfed.data, name) for name in medfed.data.__all__)
    assert issubclass(medfed.data.DatasetNotFoundError, FileNotFoundError)
    assert issubclass(medfed.data.DatasetValidationError, ValueError)


def test_data_layer_imports_no_federation_code():
    # A fresh interpreter, so that modules imported by other tests do not count.
    code = (
        "import sys, medfed.data; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'flwr' "
        "or m.startswith(('medfed.client', 'medfed.server', 'medfed.simulation', 'medfed.strategies'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stdout + result.stderr


def test_official_file_names_and_urls():
    assert medfed.data.medmnist_filename("pathmnist", 28) == "pathmnist.npz"
    assert medfed.data.medmnist_filename("pathmnist", 224) == "pathmnist_224.npz"
    assert medfed.data.medmnist_url("pathmnist", 128).endswith("/pathmnist_128.npz?download=1")
