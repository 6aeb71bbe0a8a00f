"""Exceptions and warnings raised by :mod:`medfed.data`.

Every message is one line that names the file (or dataset), says what was expected,
what was found and what to do.
"""

from __future__ import annotations

from medfed.errors import MedfedError, MedfedWarning

__all__ = [
    "ColourImagesError", "DatasetMismatchError", "DatasetNotFoundError", "DatasetValidationError", "DatasetSizeWarning",
    "LabelRangeError", "LowBitDepthWarning",
]


class DatasetNotFoundError(MedfedError, FileNotFoundError):
    """A dataset file or folder is missing and could not be downloaded."""


class DatasetValidationError(MedfedError):
    """A dataset file exists but its content is not what medfed expects."""


class DatasetMismatchError(DatasetValidationError):
    """Readable data that is not what the caller asked for (its classes, grayscale).

    Attributes
    ----------
    detail : str
        What was found, naming no file and no value (``"2 label(s) above 1"``, ``"3 of 500
        images in colour"``): a site may tell a server this much.
    """

    def __init__(self, message: str, *, detail: str) -> None:
        super().__init__(message)
        self.detail = detail

    def __reduce__(self):  # noqa: ANN204 - a keyword-only argument needs its own pickling
        return _rebuild_mismatch, (type(self), str(self), self.detail)


def _rebuild_mismatch(cls: type, message: str, detail: str) -> DatasetMismatchError:
    return cls(message, detail=detail)


class LabelRangeError(DatasetMismatchError):
    """A label outside the classes the dataset (or the caller's ``num_classes``) has."""


class ColourImagesError(DatasetMismatchError):
    """Colour images where grayscale ones were asked for."""


class DatasetSizeWarning(MedfedWarning):
    """A MedMNIST file holds split sizes that differ from the official release.

    The file is still loaded; results are then not comparable with published ones.
    """


class LowBitDepthWarning(MedfedWarning):
    """A site's 16-bit images use only a small part of 0..65535 (12-bit data saved as 16-bit).

    medfed maps 0..65535 onto 0..255, so such images become nearly black.
    """
