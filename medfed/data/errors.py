"""Exceptions and warnings raised by :mod:`medfed.data`.

Every message is one line that names the file (or dataset), says what was expected,
what was found and what to do.
"""

from __future__ import annotations

from medfed.errors import MedfedError

__all__ = ["DatasetNotFoundError", "DatasetValidationError", "DatasetSizeWarning", "LabelRangeError"]


class DatasetNotFoundError(MedfedError, FileNotFoundError):
    """A dataset file or folder is missing and could not be downloaded."""


class DatasetValidationError(MedfedError):
    """A dataset file exists but its content is not what medfed expects."""


class LabelRangeError(DatasetValidationError):
    """A label outside the classes the dataset (or the caller's ``num_classes``) has.

    Attributes
    ----------
    detail : str
        What was found, naming no file (``"label 5"``, ``"multi-label labels of 3 values"``):
        a site may tell a server this much.
    num_classes : int
        The classes (labels, for multi-label) expected.
    """

    def __init__(self, message: str, *, detail: str, num_classes: int) -> None:
        super().__init__(message)
        self.detail = detail
        self.num_classes = num_classes

    def __reduce__(self):  # noqa: ANN204 - keyword-only arguments need their own pickling
        return _label_range_error, (str(self), self.detail, self.num_classes)


def _label_range_error(message: str, detail: str, num_classes: int) -> LabelRangeError:
    return LabelRangeError(message, detail=detail, num_classes=num_classes)


class DatasetSizeWarning(UserWarning):
    """A MedMNIST file holds split sizes that differ from the official release.

    The file is still loaded; results are then not comparable with published ones.
    """
