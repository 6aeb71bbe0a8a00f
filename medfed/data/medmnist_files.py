"""Load and validate the official MedMNIST 2D ``.npz`` files.

File layout (MedMNIST v2 / MedMNIST+ on Zenodo): ``{flag}.npz`` for 28 px and
``{flag}_{size}.npz`` for 64, 128 and 224 px, each holding ``{train,val,test}_images``
(``uint8`` ``(N, S, S)`` or ``(N, S, S, 3)``) and ``{train,val,test}_labels`` (integer
``(N, 1)``, or ``(N, L)`` of 0/1 for multi-label ChestMNIST).

Every file is validated before use. Files whose sample counts differ from the official
release (``medmnist.INFO[flag]["n_samples"]``) are accepted with one
:class:`~medfed.data.errors.DatasetSizeWarning`, because a site may hold a subset.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import logging
import os
import re
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib.npyio import NpzFile

from .dataset import ImageDataset
from .errors import DatasetNotFoundError, DatasetSizeWarning, DatasetValidationError
from .info import IMAGE_SIZES, MEDMNIST_2D_FLAGS, DatasetInfo, dataset_info, medmnist_info

__all__ = [
    "load_medmnist",
    "default_data_root",
    "medmnist_filename",
    "medmnist_url",
    "medmnist_file_parts",
    "parse_medmnist_filename",
    "download_file",
    "validate_medmnist_arrays",
    "SPLITS",
]

#: Split names, in the order the loaders return them.
SPLITS = ("train", "val", "test")
_REQUIRED_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
_EMBEDDED_ROOT = Path(__file__).resolve().parent / "_embedded"
# Socket timeout (seconds without data), not a limit on the whole download.
_DOWNLOAD_TIMEOUT_S = 30.0

Downloader = Callable[[str, Path], None]
_LOGGER = logging.getLogger(__name__)


def default_data_root() -> Path:
    """Return the folder of the embedded default data (``breastmnist.npz``, 28 px only)."""
    return _EMBEDDED_ROOT


def medmnist_filename(flag: str, size: int = 28) -> str:
    """Return the official file name: ``{flag}.npz`` (28 px) or ``{flag}_{size}.npz``."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


_OFFICIAL_FILE = re.compile(r"(?P<flag>[a-z0-9]+?)(?:_(?P<size>28|64|128|224))?\.npz")


def medmnist_file_parts(name: str) -> tuple[str, int] | None:
    """``(flag, size)`` of a name in the official form (``pathmnist_64.npz`` -> ``("pathmnist", 64)``),
    whatever the flag; None for any other name."""
    match = _OFFICIAL_FILE.fullmatch(name)
    return None if match is None else (match["flag"], int(match["size"] or 28))


def parse_medmnist_filename(name: str) -> tuple[str, int] | None:
    """:func:`medmnist_file_parts` of an official file of a MedMNIST 2D dataset; None for any
    other name (a 3D or unknown flag, another file)."""
    parts = medmnist_file_parts(name)
    return parts if parts is not None and parts[0] in MEDMNIST_2D_FLAGS else None


def medmnist_url(flag: str, size: int = 28) -> str:
    """Return the official download URL of ``flag`` at ``size`` px (from ``medmnist.INFO``)."""
    return medmnist_info(flag)["url" if size == 28 else f"url_{size}"]


def _official_md5(flag: str, size: int) -> str | None:
    return medmnist_info(flag).get("MD5" if size == 28 else f"MD5_{size}")


def _open_url(url: str, timeout_s: float):
    """Open ``url`` for reading (the one place that touches the network; tests patch it)."""
    return urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 - fixed https URLs from INFO


def download_file(
    url: str, destination: str | Path, *, expected_md5: str | None = None, timeout_s: float = _DOWNLOAD_TIMEOUT_S
) -> None:
    """Download ``url`` to ``destination`` atomically.

    The bytes go to a temporary file in the destination's folder, which is renamed onto
    ``destination`` only once complete (and, if ``expected_md5`` is given, verified), so
    an interrupted download never leaves a truncated file behind.

    Raises
    ------
    OSError
        Network errors (``urllib.error.URLError``, timeouts) and file-system errors.
    DatasetValidationError
        If the downloaded bytes do not match ``expected_md5``.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    try:
        digest = hashlib.md5()  # noqa: S324 - integrity check against the published MD5, not security
        with os.fdopen(fd, "wb") as out, _open_url(url, timeout_s) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        if expected_md5 is not None and digest.hexdigest() != expected_md5:
            raise DatasetValidationError(
                f"Download of {url} has MD5 {digest.hexdigest()} but the official file has {expected_md5}; "
                f"it was discarded. Try again, or download it by hand and save it as {destination}."
            )
        os.replace(tmp_name, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def load_medmnist(
    flag: str,
    root: str | Path | None = None,
    size: int = 28,
    *,
    download: bool = True,
    downloader: Downloader | None = None,
) -> dict[str, ImageDataset]:
    """Load a MedMNIST 2D dataset from its official ``.npz`` file, validated.

    Parameters
    ----------
    flag : str
        A MedMNIST 2D flag, e.g. ``"breastmnist"``, ``"chestmnist"``, ``"pathmnist"``.
    root : str, Path or None, optional
        Folder holding ``{flag}.npz`` (28 px) or ``{flag}_{size}.npz`` (not the file
        itself). None -> the embedded default data (:func:`default_data_root`; only
        breastmnist at 28 px).
    size : int, optional
        Image side in pixels: 28, 64, 128 or 224.
    download : bool, optional
        Where the file is missing under a given ``root``, try to download it from the
        official URL into ``root`` (never into the embedded folder). A missing ``root``
        is created for the download and removed again if the download fails.
    downloader : callable or None, optional
        ``downloader(url, destination)`` writing the file; None -> :func:`download_file`
        with the official MD5 check. Injected by tests (no network in tests).

    Returns
    -------
    dict[str, ImageDataset]
        ``"train"``, ``"val"`` and ``"test"``; images ``uint8`` ``[N, size, size, C]``.

    Raises
    ------
    ValueError
        Unknown flag or unsupported size.
    DatasetNotFoundError
        ``root`` is a file, or the file is missing and could not be downloaded; the
        message names the expected path and the official URL.
    DatasetValidationError
        The file is unreadable or its arrays are not as described in the module docstring.

    Warns
    -----
    DatasetSizeWarning
        Once per call when the split sizes differ from the official release's.
    """
    info = dataset_info(flag)
    if size not in IMAGE_SIZES:
        raise DatasetValidationError(
            f"The 'size' parameter of load_medmnist must be one of {list(IMAGE_SIZES)}. Got {size!r} instead."
        )
    filename = medmnist_filename(flag, size)
    url = medmnist_url(flag, size)
    folder = default_data_root() if root is None else Path(root).expanduser()
    if folder.is_file():
        # Else the messages below would ask to save the file as <file>/<name>.
        parent = f"; pass {folder.parent}" if folder.suffix == ".npz" else ""
        raise DatasetNotFoundError(
            f"The data root {folder} is a file: --data-root / data.root (root=) must be the folder holding "
            f"{filename}, not the file itself{parent}."
        )
    path = folder / filename
    if not path.is_file():
        if downloader is None:
            downloader = functools.partial(download_file, expected_md5=_official_md5(flag, size))
        _fetch_missing(path, url, embedded=root is None, download=download, downloader=downloader)
    arrays = _read_npz(path, url)
    counts = validate_medmnist_arrays(arrays, info, size, path)
    official = medmnist_info(flag)["n_samples"]
    if any(counts[split] != official[split] for split in SPLITS):
        found = "/".join(str(counts[s]) for s in SPLITS)
        expected = "/".join(str(official[s]) for s in SPLITS)
        warnings.warn(
            f"{path} holds train/val/test = {found} samples; the official {flag} release has {expected}. "
            "Loading it anyway: results are not comparable with published ones.",
            DatasetSizeWarning,
            stacklevel=2,
        )
    datasets = {}
    for split in SPLITS:
        images = arrays[f"{split}_images"]
        images = images if images.ndim == 4 else images[..., None]  # [N, H, W, C], a view
        datasets[split] = ImageDataset(images, arrays[f"{split}_labels"], info)
    return datasets


def _fetch_missing(path: Path, url: str, *, embedded: bool, download: bool, downloader: Downloader) -> None:
    """Download a missing file or raise :class:`DatasetNotFoundError` saying what to do."""
    if path.is_dir():
        raise DatasetNotFoundError(f"MedMNIST file {path} is a folder; put the .npz file there instead.")
    if embedded:
        raise DatasetNotFoundError(
            f"{path.name} is not embedded in medfed (only breastmnist.npz at 28 px is). Download it from {url} and "
            f"give the folder that holds it (medfed train --data-root DIR, data.root in an experiment, root= in Python)."
        )
    if not download:
        raise DatasetNotFoundError(
            f"MedMNIST file {path} not found and download=False. Download {url} and save it as {path}."
        )
    # A mistyped root must not stay behind as a new empty folder when nothing was
    # downloaded into it: remove the folders made here unless the file arrived.
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _LOGGER.info("Downloading %s to %s", url, path)
            downloader(url, path)
        except (OSError, http.client.HTTPException) as error:
            typo = f" ({path.parent} did not exist: check the data root's spelling)" if created else ""
            raise DatasetNotFoundError(
                f"MedMNIST file {path} not found and its download failed ({type(error).__name__}: {error}). "
                f"Download {url} and save it as {path}{typo}."
            ) from error
        if not path.is_file():
            raise DatasetNotFoundError(
                f"MedMNIST file {path} not found after downloading {url}. Download it by hand and save it there."
            )
    except BaseException:
        for folder in created:  # deepest first; rmdir leaves a folder that is not empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _read_npz(path: Path, url: str) -> dict[str, np.ndarray]:
    """Read the six required arrays of a MedMNIST file (fully, so corruption shows here)."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, NpzFile):
            raise DatasetValidationError(
                f"MedMNIST file {path} holds a single .npy array, but an .npz archive with keys "
                f"{list(_REQUIRED_KEYS)} is expected."
            )
        with archive:
            missing = [key for key in _REQUIRED_KEYS if key not in archive.files]
            if missing:
                raise DatasetValidationError(
                    f"MedMNIST file {path} lacks keys {missing}: expected {list(_REQUIRED_KEYS)}, "
                    f"found {sorted(archive.files)}."
                )
            objects = [key for key in _REQUIRED_KEYS if _holds_objects(archive, key)]
            if objects:
                raise DatasetValidationError(
                    f"MedMNIST file {path} holds Python objects in {objects}, which are never unpickled; save "
                    "its arrays as numbers (uint8 images, integer labels)."
                )
            return {key: archive[key] for key in _REQUIRED_KEYS}
    except DatasetValidationError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        # NumPy's own advice for pickled data (load it unsafely) is not ours to give.
        detail = ("neither an .npz nor an .npy file; pickled data is never loaded" if "allow_pickle" in str(error)
                  else f"{type(error).__name__}: {error}")
        raise DatasetValidationError(
            f"MedMNIST file {path} is not a readable .npz archive ({detail}); it may be "
            f"truncated or corrupt. Replace it with an intact copy (a site: its own export; the public release: {url})."
        ) from error


def _holds_objects(archive: NpzFile, key: str) -> bool:
    """Whether ``archive[key]`` is an array of Python objects (read from its header only)."""
    try:
        with archive.zip.open(f"{key}.npy") as member:
            major, _minor = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            _shape, _order, dtype = read_header(member)
    except (KeyError, ValueError, OSError):
        return False  # reading the array says what is wrong with it
    return dtype.hasobject


def validate_medmnist_arrays(
    arrays: dict[str, np.ndarray], info: DatasetInfo, size: int, path: str | Path
) -> dict[str, int]:
    """Check the six arrays of a MedMNIST file against ``info`` and ``size``.

    Parameters
    ----------
    arrays : dict[str, np.ndarray]
        ``{split}_images`` and ``{split}_labels`` for the three splits.
    info : DatasetInfo
        Expected task, classes and channels.
    size : int
        Expected image side in pixels.
    path : str or Path
        File the arrays came from (named in messages).

    Returns
    -------
    dict[str, int]
        Number of samples per split.

    Raises
    ------
    DatasetValidationError
        On the first deviation: dtype, shape, size, channels, label shape, label values,
        or differing image and label counts.
    """
    if info.in_chans == 1:
        image_shape = f"(N, {size}, {size})"
    else:
        image_shape = f"(N, {size}, {size}, {info.in_chans})"
    counts = {}
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        where = f"MedMNIST file {path}: '{split}_images'"
        if images.dtype != np.uint8:
            raise DatasetValidationError(f"{where} must have dtype uint8. Got {images.dtype} instead.")
        channels = 1 if images.ndim == 3 else (images.shape[-1] if images.ndim == 4 else None)
        if channels != info.in_chans or (images.ndim == 4 and info.in_chans == 1):
            raise DatasetValidationError(
                f"{where} must have shape {image_shape} ({info.flag} has {info.in_chans} channel(s)). "
                f"Got {tuple(images.shape)} instead."
            )
        height, width = images.shape[1:3]
        if (height, width) != (size, size):
            hint = ""
            if height == width and height in IMAGE_SIZES:
                name = medmnist_filename(info.flag, height)
                hint = f"; check the size argument (files of {height} px are named {name})"
            raise DatasetValidationError(
                f"{where} must hold {size}x{size} px images (size={size}), shape {image_shape}. "
                f"Got {height}x{width} px, shape {tuple(images.shape)}, instead{hint}."
            )
        _validate_labels(labels, info, f"MedMNIST file {path}: '{split}_labels'")
        if labels.shape[0] != images.shape[0]:
            raise DatasetValidationError(
                f"MedMNIST file {path}: '{split}_labels' must have one row per image ({images.shape[0]} images). "
                f"Got {labels.shape[0]} labels instead."
            )
        counts[split] = int(images.shape[0])
    return counts


def _validate_labels(labels: np.ndarray, info: DatasetInfo, where: str) -> None:
    """Check label dtype, shape and values for ``info``'s task; ``where`` prefixes messages."""
    integer = np.issubdtype(labels.dtype, np.integer) or (info.is_multi_label and labels.dtype == np.bool_)
    if not integer:
        raise DatasetValidationError(f"{where} must have an integer dtype. Got {labels.dtype} instead.")
    if info.is_multi_label:
        if labels.ndim != 2 or labels.shape[1] != info.num_classes:
            raise DatasetValidationError(
                f"{where} must have shape (N, {info.num_classes}) ({info.num_classes} labels of {info.flag}). "
                f"Got {tuple(labels.shape)} instead."
            )
        bad = labels[(labels != 0) & (labels != 1)]
        if bad.size:
            raise DatasetValidationError(
                f"{where} must hold only 0 and 1 (multi-label). Got {bad.size} other value(s), e.g. {bad.flat[0]}."
            )
        return
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        raise DatasetValidationError(f"{where} must have shape (N, 1) or (N,). Got {tuple(labels.shape)} instead.")
    if labels.size:
        low, high = labels.min(), labels.max()
        if low < 0 or high >= info.num_classes:
            raise DatasetValidationError(
                f"{where} must lie in [0, {info.num_classes - 1}] ({info.num_classes} classes of {info.flag}). "
                f"Got values from {low} to {high} instead."
            )
