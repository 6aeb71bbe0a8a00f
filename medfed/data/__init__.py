"""Data layer of medfed: MedMNIST and site-folder loading, validation and metrics.

Knows nothing of federation: imports numpy, torch, Pillow and scikit-learn (MedMNIST's
metadata come from medfed's copy of ``medmnist.INFO``, not from the medmnist package), never flwr or medfed's client, server or simulation parts.
"""

from .dataset import ImageDataset, TrainAugmentation, default_hflip_p, train_augmentation
from .errors import DatasetNotFoundError, DatasetSizeWarning, DatasetValidationError
from .info import DatasetInfo, dataset_info
from .medmnist_files import (
    default_data_root, load_medmnist, medmnist_filename, medmnist_url, parse_medmnist_filename,
)
from .metrics import classification_metrics, confusion, equity_scaled, group_metrics
from .site_folder import load_site_folder

__all__ = [
    "DatasetInfo",
    "ImageDataset",
    "load_medmnist",
    "load_site_folder",
    "classification_metrics",
    "confusion",
    "group_metrics",
    "equity_scaled",
    "train_augmentation",
    "default_hflip_p",
    "TrainAugmentation",
    "DatasetNotFoundError",
    "DatasetValidationError",
    "DatasetSizeWarning",
    "default_data_root",
    "dataset_info",
    "medmnist_filename",
    "parse_medmnist_filename",
    "medmnist_url",
]
