"""Exceptions and warnings raised by :mod:`medfed.data`.

Every message is one line that names the file (or dataset), says what was expected,
what was found and what to do.
"""

from __future__ import annotations

from medfed.errors import MedfedError

__all__ = ["DatasetNotFoundError", "DatasetValidationError", "DatasetSizeWarning"]


class DatasetNotFoundError(MedfedError, FileNotFoundError):
    """A dataset file or folder is missing and could not be downloaded."""


class DatasetValidationError(MedfedError):
    """A dataset file exists but its content is not what medfed expects."""


class DatasetSizeWarning(UserWarning):
    """A MedMNIST file holds split sizes that differ from the official release.

    The file is still loaded; results are then not comparable with published ones.
    """
