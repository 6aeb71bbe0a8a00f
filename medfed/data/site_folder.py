"""Load a hospital's own images from a folder of PNG/JPEG files and CSV labels.

Two layouts are accepted::

    site/                              site/
      train/labels.csv  + images         labels.csv   (filename,label[,group][,split])
      val/labels.csv    + images         images/...
      test/labels.csv   + images

``labels.csv`` is UTF-8 text (a byte-order mark is allowed) with a header row holding
the columns ``filename`` (path relative to the CSV's folder) and ``label``, and
optionally ``group`` (an integer patient-group id >= 0; empty or -1 = unknown) and, in
the single-CSV layout, ``split`` (``train``/``val``/``test``; without it every row
belongs to ``train``). Labels are integer class indices;
for the multi-label task a label is a list of 0/1 values separated by spaces or ``;``
(e.g. ``0;1;0``). Only the splits present are returned.

Images are read with Pillow and turned upright by their EXIF orientation (as image
viewers show them). If every image is grayscale they are kept as 1 channel, otherwise
all are converted to RGB (grayscale replicated); alpha is dropped; 16-bit grayscale is
scaled to 8 bits (value / 257), with a :class:`LowBitDepthWarning` when no image of the
site exceeds 4095 (12-bit data saved as 16-bit would be nearly black). Where grayscale
images are asked for, an RGB file whose three channels are equal (a gray X-ray that a
converter saved as RGB or JPEG) counts as grayscale. All images must then have the same
size.
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .dataset import UNKNOWN_GROUP, ImageDataset
from .errors import ColourImagesError, DatasetNotFoundError, DatasetValidationError, LabelRangeError, LowBitDepthWarning
from .info import BINARY_CLASS, DatasetInfo, normalize_task

__all__ = ["is_site_folder", "load_site_folder", "LABELS_CSV"]

#: Name of the label file.
LABELS_CSV = "labels.csv"
_SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
_GRAY_MODES = {"1", "L", "LA", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# Missing files are listed up to this many in one message.
_MAX_LISTED = 5
#: Most classes inferred from a site's labels: MedMNIST's largest 2D set has 11, and a
#: larger label is more likely a patient id or a date in the wrong column, whose value
#: would otherwise size the model's head.
_MAX_INFERRED_CLASSES = 1000
# A label or group cell: ASCII digits only (int() also takes "1_0", "+1" and other scripts' digits).
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class _Row:
    split: str
    image_path: Path
    label: tuple[int, ...]  # one class index, or L values of 0/1 (multi-label)
    group: int
    where: str  # "file.csv line N" for messages


def is_site_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a site folder's ``labels.csv`` (at its top or in a split folder)."""
    root = Path(path).expanduser()
    return (root / LABELS_CSV).is_file() or any((root / split / LABELS_CSV).is_file() for split in _SPLITS)


def load_site_folder(
    path: str | Path, task: str = "multi-class", num_classes: int | None = None, flag: str = "site",
    in_chans: int | None = None,
) -> dict[str, ImageDataset]:
    """Load a site folder (see the module docstring for the layouts) into datasets.

    Parameters
    ----------
    path : str or Path
        The site folder.
    task : str, optional
        ``"multi-class"``, ``"binary-class"``, ``"multi-label, binary-class"`` (or
        ``"multi-label"``) or ``"ordinal-regression"``.
    num_classes : int or None, optional
        Number of classes (labels, for multi-label). None -> inferred: largest label + 1
        (at least 2), or the length of the multi-label vectors.
    flag : str, optional
        Name stored in :attr:`DatasetInfo.flag`.
    in_chans : int or None, optional
        1: the images must be grayscale (colour ones are named). None or 3: colour when
        any image is, gray images then repeated in every channel.

    Returns
    -------
    dict[str, ImageDataset]
        Split name (``"train"``, ``"val"``, ``"test"``, those present) -> dataset with
        ``uint8`` images ``[N, H, W, C]`` (``C`` 1 or 3) and ``groups`` when the CSV has
        a ``group`` column.

    Raises
    ------
    DatasetNotFoundError
        The folder, a ``labels.csv`` or an image file is missing.
    DatasetValidationError
        A CSV that is not UTF-8, bad CSV header, non-integer or out-of-range label
        (:class:`LabelRangeError`), duplicate filename, unknown split, unreadable image,
        images of different sizes, or colour images where ``in_chans`` is 1
        (:class:`ColourImagesError`).
    """
    root = Path(path).expanduser()
    task = normalize_task(task)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Site folder {root} not found. Expected a folder holding {LABELS_CSV} (filename,label[,group][,split]) "
            f"or train/ val/ test/ subfolders each with {LABELS_CSV} and images."
        )
    rows, has_groups = _read_rows(root, task)
    _refuse_images_listed_twice(rows)
    num_classes = _resolve_num_classes(rows, task, num_classes, root)
    images, in_chans = _read_images(rows, root, grayscale=in_chans == 1)
    info = DatasetInfo(flag=flag, task=task, num_classes=num_classes, in_chans=in_chans,
                       label_names={str(i): str(i) for i in range(num_classes)})
    datasets = {}
    for split in _SPLITS:
        index = [i for i, row in enumerate(rows) if row.split == split]
        if not index:
            continue
        split_images = np.stack([images[i] for i in index])
        if task == "multi-label, binary-class":
            labels = np.array([rows[i].label for i in index], dtype=np.int64).reshape(len(index), num_classes)
        else:
            labels = np.array([rows[i].label[0] for i in index], dtype=np.int64)
        groups = np.array([rows[i].group for i in index], dtype=np.int64) if has_groups else None
        datasets[split] = ImageDataset(split_images, labels, info, groups=groups)
    return datasets


def _read_rows(root: Path, task: str) -> tuple[list[_Row], bool]:
    """Find the layout and parse every CSV; return the rows and whether groups exist."""
    top_csv = root / LABELS_CSV
    split_dirs = [root / split for split in _SPLITS if (root / split).is_dir()]
    if top_csv.is_file():
        nested = [d / LABELS_CSV for d in split_dirs if (d / LABELS_CSV).is_file()]
        if nested:
            raise DatasetValidationError(
                f"Site folder {root} holds both {top_csv.name} and {nested[0].relative_to(root)}: "
                "expected one layout (a top labels.csv with a split column, or one labels.csv per split folder)."
            )
        return _parse_csv(top_csv, task, split=None)
    if not split_dirs:
        raise DatasetNotFoundError(
            f"Site folder {root} holds neither {LABELS_CSV} nor train/ val/ test/ subfolders; "
            f"add {LABELS_CSV} (filename,label[,group][,split]) at its top."
        )
    rows: list[_Row] = []
    has_groups = []
    for split_dir in split_dirs:
        csv_path = split_dir / LABELS_CSV
        if not csv_path.is_file():
            raise DatasetNotFoundError(
                f"Site folder split {split_dir} has no {LABELS_CSV}; add one with the header filename,label[,group]."
            )
        split_rows, split_has_groups = _parse_csv(csv_path, task, split=split_dir.name)
        rows.extend(split_rows)
        has_groups.append(split_has_groups)
    if len(set(has_groups)) > 1:
        raise DatasetValidationError(
            f"Site folder {root}: either every split's {LABELS_CSV} has a 'group' column or none has; "
            f"found it in {[d.name for d, g in zip(split_dirs, has_groups) if g]} only."
        )
    return rows, has_groups[0]


def _refuse_images_listed_twice(rows: list[_Row]) -> None:
    """One image file listed twice, by any spelling of its path (``./``, ``..``, a linked
    folder) and in any of the site's CSVs, is refused: in two splits it would put a training
    image in the test set. Two names that link to one stored file (a git-annex or DVC store
    keeps identical images once) are two entries, as listed."""
    first: dict[Path, _Row] = {}
    for row in rows:
        key = row.image_path.parent.resolve() / row.image_path.name
        if key in first:
            earlier = first[key]
            raise DatasetValidationError(
                f"{row.where}: {row.image_path.name!r} is listed twice (first at {earlier.where}, split "
                f"{earlier.split}; here split {row.split}; both are {key}); each image must appear once."
            )
        first[key] = row


def _parse_csv(csv_path: Path, task: str, split: str | None) -> tuple[list[_Row], bool]:
    """Parse one labels.csv; ``split`` None means the split comes from a 'split' column."""
    with io.StringIO(_read_text(csv_path), newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip().lower() for name in (reader.fieldnames or [])]
        if "filename" not in header or "label" not in header:
            semicolons = len(header) == 1 and ";" in header[0]
            hint = (" It looks separated by ';' (Excel in some languages): save it with ',' between cells."
                    if semicolons else "")
            raise DatasetValidationError(
                f"{csv_path} must start with a header row holding 'filename' and 'label' (optionally 'group'"
                f"{', split' if split is None else ''}). Got {reader.fieldnames} instead.{hint}"
            )
        if split is not None and "split" in header:
            raise DatasetValidationError(
                f"{csv_path} lies in the split folder '{split}', so it must not have a 'split' column."
            )
        reader.fieldnames = header
        has_groups = "group" in header
        rows: list[_Row] = []
        for record in reader:
            where = f"{csv_path} line {reader.line_num}"
            extra = [cell for cell in record.get(None, []) if cell.strip()]  # csv's cells beyond the header
            if extra:
                raise DatasetValidationError(
                    f"{where}: {len(header) + len(record[None])} cells where the header has {len(header)} "
                    f"(extra: {extra[0]!r}); put a filename holding ',' in double quotes."
                )
            record = {key: (value or "").strip() for key, value in record.items() if key is not None}
            filename = record["filename"]
            if not filename:
                raise DatasetValidationError(f"{where}: the filename is empty.")
            rows.append(_Row(
                split=_parse_split(record.get("split", ""), where) if split is None else split,
                image_path=_image_path(csv_path.parent, filename),
                label=_parse_label(record["label"], task, where),
                group=_parse_group(record.get("group", ""), where) if has_groups else UNKNOWN_GROUP,
                where=where,
            ))
    if not rows:
        raise DatasetValidationError(f"{csv_path} lists no images; expected at least one row after the header.")
    return rows, has_groups


def _image_path(folder: Path, filename: str) -> Path:
    """``folder / filename``; a Windows path (``images\\a.png``, as Excel or pandas on
    Windows write it) is read with ``/`` where only that spelling names a file."""
    path = folder / filename
    if "\\" in filename and not path.exists():
        posix = folder / filename.replace("\\", "/")
        if posix.exists():
            return posix
    return path


def _read_text(csv_path: Path) -> str:
    """The CSV's text, decoded as UTF-8 with an optional byte-order mark (Excel writes one)."""
    data = csv_path.read_bytes()
    try:
        # Decoded whole, not through a text file: the error's position is then the file's
        # byte offset (a text file reports it within its current 8 KiB chunk).
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DatasetValidationError(
            f"{csv_path} is not UTF-8 text: byte 0x{data[error.start]:02x} at byte offset {error.start} (line {line}) "
            "is invalid; save the file as UTF-8 (e.g. 'CSV UTF-8' in Excel)."
        ) from None
    return text.removeprefix("\ufeff")


def _parse_split(value: str, where: str) -> str:
    if value == "":  # no split column (or an empty cell): the row is training data
        return "train"
    if value.lower() not in _SPLIT_ALIASES:
        raise DatasetValidationError(f"{where}: split must be train, val or test. Got {value!r} instead.")
    return _SPLIT_ALIASES[value.lower()]


def _parse_label(value: str, task: str, where: str) -> tuple[int, ...]:
    if task == "multi-label, binary-class":
        parts = value.replace(";", " ").split()
        if not parts or any(part not in ("0", "1") for part in parts):
            raise LabelRangeError(
                f"{where}: a multi-label label must be 0/1 values separated by spaces or ';' (e.g. '0;1;0'). "
                f"Got {value!r} instead.",
                detail="labels that are not 0/1 values",
            )
        return tuple(int(part) for part in parts)
    if not _INTEGER.fullmatch(value):
        raise LabelRangeError(
            f"{where}: label must be an integer class index ({task}). Got {value!r} instead.",
            detail="labels that are not class indices",
        )
    label = int(value)
    if label < 0:
        raise DatasetValidationError(f"{where}: label must be >= 0. Got {label} instead.")
    return (label,)


def _parse_group(value: str, where: str) -> int:
    if value == "":
        return UNKNOWN_GROUP
    group = int(value) if _INTEGER.fullmatch(value) else None
    if group is None or group < UNKNOWN_GROUP:
        raise DatasetValidationError(
            f"{where}: group must be an integer id >= 0 (or empty / -1 for unknown). Got {value!r} instead."
        )
    return group


def _resolve_num_classes(rows: list[_Row], task: str, num_classes: int | None, root: Path) -> int:
    """Infer or check the number of classes (labels, for multi-label) against every row."""
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(
            f"The 'num_classes' parameter of load_site_folder must be an int >= 2 or None. Got {num_classes!r} instead."
        )
    if task == "multi-label, binary-class":
        expected = num_classes if num_classes is not None else len(rows[0].label)
        for row in rows:
            if len(row.label) != expected:
                raise LabelRangeError(
                    f"{row.where}: a multi-label label must have {expected} values "
                    f"({'num_classes' if num_classes is not None else 'as in ' + rows[0].where}). "
                    f"Got {len(row.label)} instead.",
                    detail=f"labels of {len(row.label)} values",
                )
        return expected
    if task == BINARY_CLASS and num_classes not in (None, 2):
        raise ValueError(f"A binary-class site folder has 2 classes, but num_classes={num_classes} was given.")
    largest = max(rows, key=lambda row: row.label[0])
    if num_classes is None and largest.label[0] >= _MAX_INFERRED_CLASSES:
        raise LabelRangeError(
            f"{largest.where}: label {largest.label[0]} is not a plausible class index (labels are 0, 1, ... "
            f"one per class; medfed infers at most {_MAX_INFERRED_CLASSES} classes); check that column "
            "(a patient id or a date?).",
            detail=f"a label above {_MAX_INFERRED_CLASSES - 1}",
        )
    if num_classes is None:
        num_classes = 2 if task == BINARY_CLASS else max(2, largest.label[0] + 1)
    if largest.label[0] >= num_classes:
        beyond = sum(row.label[0] >= num_classes for row in rows)
        raise LabelRangeError(
            f"{largest.where}: label {largest.label[0]} is unknown; site folder {root} has {num_classes} classes "
            f"(labels 0 to {num_classes - 1}).",
            # Travels to the server (a study mismatch): counts, never a label's value.
            detail=f"{beyond} label(s) above {num_classes - 1}",
        )
    return num_classes


def _read_images(rows: list[_Row], root: Path, grayscale: bool = False) -> tuple[list[np.ndarray], int]:
    """Read every image as ``uint8`` ``[H, W, C]`` with one common channel count (1 or 3);
    with ``grayscale``, refuse colour images by name (a few among thousands are otherwise
    hard to find)."""
    missing = [row for row in rows if not row.image_path.is_file()]
    if missing:
        listed = ", ".join(f"{row.image_path} ({row.where})" for row in missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise DatasetNotFoundError(f"{len(missing)} image file(s) listed in labels.csv are missing: {listed}{more}.")
    read = [_read_image(row.image_path) for row in rows]
    images = [image for image, _ in read]
    _warn_low_bit_depth([peak for _, peak in read if peak is not None], root)
    if grayscale:  # an RGB file of a gray image (equal channels) is a grayscale image
        images = [image[..., :1] if image.shape[2] == 3 and (image == image[..., :1]).all() else image
                  for image in images]
    colour = [row for row, image in zip(rows, images) if image.shape[2] == 3]
    if grayscale and colour:
        listed = ", ".join(str(row.image_path) for row in colour[:_MAX_LISTED])
        more = f" and {len(colour) - _MAX_LISTED} more" if len(colour) > _MAX_LISTED else ""
        raise ColourImagesError(
            f"{len(colour)} of {len(rows)} images are in colour where grayscale ones are needed: {listed}{more}; "
            "save them as grayscale.",
            detail=f"{len(colour)} of {len(rows)} images in colour",
        )
    in_chans = 3 if colour else 1
    if in_chans == 3:
        # Same as Pillow's L -> RGB conversion: the gray value in every channel.
        images = [np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image for image in images]
    height, width = images[0].shape[:2]
    for row, image in zip(rows, images):
        if image.shape[:2] != (height, width):
            raise DatasetValidationError(
                f"Image {row.image_path} is {image.shape[1]}x{image.shape[0]} px (width x height) but "
                f"{rows[0].image_path} is {width}x{height} px; all images of a site must have the same size "
                "(resize them first)."
            )
    return images, in_chans


#: 16-bit images that all stay below this hold at most 12 bits of data.
_TWELVE_BIT_LIMIT = 4096


def _warn_low_bit_depth(peaks: list[int], folder: Path) -> None:
    """Warn once when every 16-bit image of a site stays within 12 bits (``peaks``: their maxima)."""
    if peaks and max(peaks) < _TWELVE_BIT_LIMIT:
        warnings.warn(
            f"The {len(peaks)} 16-bit images under {folder} reach at most {max(peaks)} of 65535 (12-bit data saved "
            f"as 16-bit?): medfed maps 0..65535 onto 0..255, so they become 0..{round(max(peaks) / 257)}, nearly "
            "black. Rescale them to the full 16-bit range, or save them as 8-bit.",
            LowBitDepthWarning, stacklevel=4,
        )


def _read_image(image_path: Path) -> tuple[np.ndarray, int | None]:
    """Read one image as ``uint8`` ``[H, W, 1]`` (grayscale) or ``[H, W, 3]`` (colour), with its
    largest value when it is a 16-bit image (else None)."""
    peak = None
    try:
        with Image.open(image_path) as image:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # upright, as viewers show it
            mode = image.mode
            if mode in _SIXTEEN_BIT_MODES:
                values = np.asarray(image, dtype=np.int64)
                peak = int(values.max())
                if values.min() < 0 or peak > 65535:
                    raise DatasetValidationError(
                        f"Image {image_path} (mode {mode}) holds values outside 0..65535; expected 8- or 16-bit pixels."
                    )
                array = np.rint(values / 257.0).astype(np.uint8)
            elif mode in _GRAY_MODES:
                array = np.asarray(image.convert("L"), dtype=np.uint8)
            elif mode == "F":
                raise DatasetValidationError(
                    f"Image {image_path} holds floating-point pixels (mode F); expected 8- or 16-bit grayscale or RGB."
                )
            else:  # RGB, RGBA, P (palette), CMYK, YCbCr, ...
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
                if mode in ("P", "PA") and (array == array[..., :1]).all():
                    array = array[..., 0]  # a gray palette: a grayscale image
    except Image.DecompressionBombError as error:  # Pillow's guard against huge images: no OSError
        raise DatasetValidationError(
            f"Image {image_path} is too large to read safely ({error}); medfed trains on images of a few hundred "
            "pixels a side: resize it first."
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DatasetValidationError(
            f"Image {image_path} cannot be read as an image ({type(error).__name__}: {error}); "
            "expected a PNG or JPEG file."
        ) from error
    return (array[..., None] if array.ndim == 2 else array), peak
