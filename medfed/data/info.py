"""What a dataset is: task, number of model outputs, channels and label names.

MedMNIST metadata come from ``medmnist.INFO`` (MedMNIST v2, Yang et al., Scientific Data
10, 41, 2023), through medfed's copy of its 2D entries (:mod:`medfed._medmnist_info`,
checked against the installed package by the tests): ``import medmnist`` costs seconds in
every process (it imports torchvision). Only the metadata are used: medmnist's dataset
classes assert the official sample counts, which local files (such as a subset of a
split) need not match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medfed._medmnist_info import FLAGS_3D, INFO_2D
from medfed.data.errors import DatasetValidationError

__all__ = [
    "DatasetInfo",
    "dataset_info",
    "normalize_task",
    "MEDMNIST_2D_FLAGS",
    "IMAGE_SIZES",
    "TASKS",
    "MULTI_CLASS",
    "BINARY_CLASS",
    "MULTI_LABEL",
    "ORDINAL_REGRESSION",
]

MULTI_CLASS = "multi-class"
BINARY_CLASS = "binary-class"
MULTI_LABEL = "multi-label, binary-class"
ORDINAL_REGRESSION = "ordinal-regression"
#: The task strings of ``medmnist.INFO``.
TASKS = (MULTI_CLASS, BINARY_CLASS, MULTI_LABEL, ORDINAL_REGRESSION)
# Short spellings users write by hand (site folders, configs).
_TASK_ALIASES = {"multi-label": MULTI_LABEL, "multilabel": MULTI_LABEL, "binary": BINARY_CLASS,
                 "multiclass": MULTI_CLASS, "ordinal": ORDINAL_REGRESSION}

#: The MedMNIST 2D datasets (the 3D ones hold volumes, which medfed does not model).
MEDMNIST_2D_FLAGS = tuple(INFO_2D)
#: The image sizes (pixels per side) of the MedMNIST+ releases.
IMAGE_SIZES = (28, 64, 128, 224)


@dataclass(frozen=True)
class DatasetInfo:
    """Description of a classification dataset, enough to build a model for it.

    Parameters
    ----------
    flag : str
        Dataset name, e.g. ``"breastmnist"`` or ``"site"`` for a hospital folder.
    task : str
        One of :data:`TASKS` (``medmnist.INFO``'s strings).
    num_classes : int
        Number of model outputs: classes, or labels for the multi-label task.
    in_chans : int
        Image channels, 1 (grayscale) or 3 (RGB).
    label_names : dict[str, str]
        Class (or label) index as a string -> human-readable name.
    """

    flag: str
    task: str
    num_classes: int
    in_chans: int
    label_names: dict[str, str] = field(default_factory=dict)

    @property
    def is_multi_label(self) -> bool:
        """Whether a sample holds one 0/1 target per label (``labels`` is [N, L])."""
        return self.task == MULTI_LABEL


def normalize_task(task: str) -> str:
    """Return the ``medmnist.INFO`` spelling of ``task``.

    Accepts the four INFO strings and the short forms ``"multi-label"``, ``"binary"``,
    ``"multiclass"`` and ``"ordinal"``.

    Raises
    ------
    ValueError
        If ``task`` is none of these.
    """
    if task in TASKS:
        return task
    if isinstance(task, str) and task.strip().lower() in _TASK_ALIASES:
        return _TASK_ALIASES[task.strip().lower()]
    raise DatasetValidationError(
        f"The 'task' must be one of {list(TASKS)} (or 'multi-label', 'binary'). Got {task!r} instead."
    )


def medmnist_info(flag: str) -> dict[str, Any]:
    """Return ``medmnist.INFO[flag]`` (the keys medfed uses) for a 2D flag, or raise a ValueError naming the choices."""
    if flag not in MEDMNIST_2D_FLAGS:
        hint = " (3D datasets are not supported)" if flag in FLAGS_3D else ""
        raise DatasetValidationError(
            f"Unknown MedMNIST 2D dataset {flag!r}{hint}. Expected one of {list(MEDMNIST_2D_FLAGS)}."
        )
    return INFO_2D[flag]


def dataset_info(flag: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of a MedMNIST 2D dataset.

    ``num_classes`` is the number of entries of INFO's label dict; ordinal regression
    (retinamnist) is treated as multi-class classification over its grades.

    Raises
    ------
    ValueError
        If ``flag`` is not a MedMNIST 2D flag.
    """
    meta = medmnist_info(flag)
    return DatasetInfo(
        flag=flag,
        task=meta["task"],
        num_classes=len(meta["label"]),
        in_chans=int(meta["n_channels"]),
        label_names={str(k): str(v) for k, v in meta["label"].items()},
    )
