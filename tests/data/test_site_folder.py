"""Site folders: generated PNG/JPEG images with labels.csv, both layouts and every failure."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfed.data import DatasetNotFoundError, DatasetValidationError, load_site_folder
from medfed.data.errors import LowBitDepthWarning


def _write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _write_csv(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _gray(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)


def _split_layout(root: Path, with_groups: bool = True) -> dict[str, list[tuple[str, np.ndarray, int, int]]]:
    """train/ val/ test/ folders with gray PNGs; returns split -> [(name, pixels, label, group)]."""
    content = {
        "train": [("a.png", _gray(0), 0, 1), ("b.png", _gray(1), 2, 0), ("c.png", _gray(2), 1, 1)],
        "val": [("d.png", _gray(3), 1, 0)],
        "test": [("e.png", _gray(4), 0, 2), ("f.png", _gray(5), 2, 0)],
    }
    for split, rows in content.items():
        header = "filename,label,group" if with_groups else "filename,label"
        lines = [header]
        for name, pixels, label, group in rows:
            _write_png(root / split / name, pixels)
            lines.append(f"{name},{label},{group}" if with_groups else f"{name},{label}")
        _write_csv(root / split / "labels.csv", lines)
    return content


def test_split_folders_round_trip_with_groups(tmp_path):
    # Prepare
    content = _split_layout(tmp_path)
    # Execute
    datasets = load_site_folder(tmp_path, flag="hospital-a")
    # Assert
    assert list(datasets) == ["train", "val", "test"]
    for split, rows in content.items():
        dataset = datasets[split]
        np.testing.assert_array_equal(dataset.images[..., 0], np.stack([r[1] for r in rows]))
        assert dataset.labels.tolist() == [r[2] for r in rows]
        assert dataset.groups.tolist() == [r[3] for r in rows]
    info = datasets["train"].info
    assert (info.flag, info.task, info.num_classes, info.in_chans) == ("hospital-a", "multi-class", 3, 1)
    _, label, group = datasets["test"][1]
    assert (label.item(), group.item()) == (2, 0)


def test_without_group_column_groups_are_none(tmp_path):
    _split_layout(tmp_path, with_groups=False)
    datasets = load_site_folder(tmp_path, num_classes=4)
    assert datasets["train"].groups is None and datasets["train"].info.num_classes == 4
    assert datasets["val"][0][2].item() == -1


def test_single_csv_with_split_column_and_mixed_modes_becomes_rgb(tmp_path):
    # Prepare: one RGB PNG, one gray PNG, one RGBA PNG, one JPEG; split column; empty group = unknown
    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    gray = _gray(1, size=6)
    rgba = np.dstack([rgb[::-1], np.full((6, 6), 128, np.uint8)])
    _write_png(tmp_path / "img" / "rgb.png", rgb)
    _write_png(tmp_path / "img" / "gray.png", gray)
    _write_png(tmp_path / "img" / "rgba.png", rgba)
    Image.fromarray(rgb).save(tmp_path / "img" / "photo.jpg", quality=95)
    _write_csv(tmp_path / "labels.csv", [
        "filename,label,group,split",
        "img/rgb.png,1,0,train",
        "img/gray.png,0,,train",
        "img/rgba.png,1,1,test",
        "img/photo.jpg,0,1,Validation",
    ])
    # Execute
    datasets = load_site_folder(tmp_path, task="binary-class")
    # Assert
    train = datasets["train"]
    assert train.images.shape == (2, 6, 6, 3) and train.info.in_chans == 3 and train.info.num_classes == 2
    np.testing.assert_array_equal(train.images[0], rgb)
    np.testing.assert_array_equal(train.images[1], np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(datasets["test"].images[0], rgb[::-1])  # alpha dropped
    assert train.groups.tolist() == [0, -1]
    assert len(datasets["val"]) == 1 and datasets["val"].images.shape == (1, 6, 6, 3)


def test_csv_without_split_column_is_all_train(tmp_path):
    _write_png(tmp_path / "x.png", _gray(0))
    _write_png(tmp_path / "y.png", _gray(1))
    _write_csv(tmp_path / "labels.csv", ["filename,label", "x.png,0", "y.png,1"])
    datasets = load_site_folder(tmp_path)
    assert list(datasets) == ["train"] and len(datasets["train"]) == 2


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path):
    # Prepare: 16-bit values 0, 257 * 100, 65535 -> 0, 100, 255
    pixels = np.array([[0, 25700], [65535, 257]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    _write_csv(tmp_path / "labels.csv", ["filename,label", "deep.png,1"])
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full 16-bit range: no warning
        train = load_site_folder(tmp_path)["train"]
    # Assert
    assert train.images[0, ..., 0].tolist() == [[0, 100], [255, 1]]


def test_twelve_bit_data_in_sixteen_bit_images_is_warned_about_once(tmp_path):
    # Prepare: two 12-bit exports (0..4095) saved as 16-bit PNGs: 0..16 once mapped to 8 bits.
    for name, peak in (("a.png", 4095), ("b.png", 2000)):
        Image.fromarray(np.array([[0, peak], [peak // 2, 7]], dtype=np.uint16)).save(tmp_path / name)
    _write_csv(tmp_path / "labels.csv", ["filename,label", "a.png,0", "b.png,1"])
    # Execute
    with pytest.warns(LowBitDepthWarning) as caught:
        load_site_folder(tmp_path)
    # Assert
    assert len(caught) == 1
    assert f"The 2 16-bit images under {tmp_path} reach at most 4095 of 65535" in str(caught[0].message)


def test_multi_label_site(tmp_path):
    for i in range(2):
        _write_png(tmp_path / f"{i}.png", _gray(i))
    _write_csv(tmp_path / "labels.csv", ["filename,label", "0.png,0;1;1", "1.png,1 0 0"])
    train = load_site_folder(tmp_path, task="multi-label")["train"]
    assert train.info.task == "multi-label, binary-class" and train.info.num_classes == 3
    assert train.labels.tolist() == [[0, 1, 1], [1, 0, 0]]


# --- failures ----------------------------------------------------------------------------


def _one_image_site(root: Path, csv_lines: list[str]) -> None:
    _write_png(root / "a.png", _gray(0))
    _write_png(root / "b.png", _gray(1))
    _write_csv(root / "labels.csv", csv_lines)


@pytest.mark.parametrize(
    ("lines", "kwargs", "fragments"),
    [
        (["filename,label", "a.png,1", "b.png,2"], {"num_classes": 2}, ["line 3", "label 2 is unknown", "2 classes"]),
        (["filename,label", "a.png,benign"], {}, ["line 2", "integer", "'benign'"]),
        (["filename,label", "a.png,-1"], {}, ["line 2", ">= 0", "-1"]),
        (["filename,label", "a.png,0", "b.png,1", "a.png,1"], {}, ["line 4", "'a.png' is listed twice", "line 2"]),
        (["name,class", "a.png,0"], {}, ["'filename' and 'label'", "['name', 'class']"]),
        (["filename,label,split", "a.png,0,holdout"], {}, ["line 2", "train, val or test", "'holdout'"]),
        (["filename,label,group", "a.png,0,female"], {}, ["line 2", "group must be an integer", "'female'"]),
        (["filename,label"], {}, ["lists no images"]),
        (["filename,label", "a.png,0 1", "b.png,1 0 1"], {"task": "multi-label"}, ["line 3", "2 values", "Got 3"]),
        (["filename,label", "a.png,0;2"], {"task": "multi-label"}, ["0/1 values", "'0;2'"]),
        # int() reads "1_0" as 10 and "+1" as 1: a label is ASCII digits only.
        (["filename,label", "a.png,1_0"], {}, ["line 2", "integer", "'1_0'"]),
        (["filename,label,group", "a.png,0,1_0"], {}, ["line 2", "group must be an integer", "'1_0'"]),
        # A patient id in the label column: refused at once (it sized a 10^7-class head: 2 GB).
        (["filename,label", "a.png,0", "b.png,99999999999"], {}, ["line 3", "99999999999", "not a plausible class"]),
        # A cell beyond the header's (an unquoted comma in a name) was dropped without a word.
        (["filename,label", "a.png,0,7"], {}, ["line 2", "3 cells where the header has 2", "'7'"]),
        (["filename;label", "a.png;0"], {}, ["'filename' and 'label'", "separated by ';'"]),
    ],
)
def test_csv_errors_name_line_and_value(tmp_path, lines, kwargs, fragments):
    # Prepare
    _one_image_site(tmp_path, lines)
    # Execute
    with pytest.raises(DatasetValidationError) as caught:
        load_site_folder(tmp_path, **kwargs)
    # Assert
    message = str(caught.value)
    assert "labels.csv" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_csv_that_is_not_utf8_names_the_byte_and_asks_for_utf8(tmp_path):
    # Prepare: a labels.csv saved as Latin-1 (Excel's "CSV" on Windows); "é" is byte 0xe9
    _write_png(tmp_path / "a.png", _gray(0))
    _write_png(tmp_path / "caf\u00e9.png", _gray(1))
    (tmp_path / "labels.csv").write_bytes("filename,label\na.png,0\ncaf\u00e9.png,1\n".encode("latin-1"))
    # Execute
    with pytest.raises(DatasetValidationError) as caught:
        load_site_folder(tmp_path)
    # Assert: 0xe9 is byte 26 (0-based: 15 + 8 + len("caf")) of the file, on line 3
    message = str(caught.value)
    assert str(tmp_path / "labels.csv") in message
    assert "0xe9 at byte offset 26 (line 3)" in message and "save the file as UTF-8" in message


def test_csv_with_utf8_byte_order_mark_loads(tmp_path):
    _write_png(tmp_path / "a.png", _gray(0))
    (tmp_path / "labels.csv").write_bytes("\ufefffilename,label\r\na.png,1\r\n".encode("utf-8"))
    datasets = load_site_folder(tmp_path)
    assert datasets["train"].labels.tolist() == [1]


def test_missing_image_files_are_named(tmp_path):
    _one_image_site(tmp_path, ["filename,label", "a.png,0", "gone.png,1", "also_gone.png,0"])
    with pytest.raises(DatasetNotFoundError) as caught:
        load_site_folder(tmp_path)
    message = str(caught.value)
    assert "2 image file(s)" in message and "gone.png" in message and "also_gone.png" in message
    assert "line 3" in message


def test_images_of_different_sizes_are_rejected_naming_the_file(tmp_path):
    _write_png(tmp_path / "small.png", _gray(0, size=8))
    _write_png(tmp_path / "large.png", _gray(1, size=10))
    _write_csv(tmp_path / "labels.csv", ["filename,label", "small.png,0", "large.png,1"])
    with pytest.raises(DatasetValidationError) as caught:
        load_site_folder(tmp_path)
    message = str(caught.value)
    assert "large.png is 10x10 px" in message and "small.png is 8x8 px" in message


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    _write_csv(tmp_path / "labels.csv", ["filename,label", "broken.png,0"])
    with pytest.raises(DatasetValidationError) as caught:
        load_site_folder(tmp_path)
    assert "broken.png cannot be read as an image" in str(caught.value)


def test_an_image_too_large_to_read_safely_is_named(tmp_path, monkeypatch):
    # Pillow refuses images above twice MAX_IMAGE_PIXELS (a 14000 x 14000 scan by default)
    # with an error that is no OSError; lowered here so that an 8 x 8 image trips it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    _write_png(tmp_path / "huge.png", _gray(0))
    _write_csv(tmp_path / "labels.csv", ["filename,label", "huge.png,0"])
    with pytest.raises(DatasetValidationError, match="huge.png is too large to read safely .*resize it first"):
        load_site_folder(tmp_path)


def test_missing_folder_and_missing_csv(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not found"):
        load_site_folder(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="neither labels.csv nor train/ val/ test/"):
        load_site_folder(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetNotFoundError, match="train has no labels.csv"):
        load_site_folder(tmp_path)


def test_both_layouts_at_once_is_ambiguous(tmp_path):
    _split_layout(tmp_path)
    _write_csv(tmp_path / "labels.csv", ["filename,label", "train/a.png,0"])
    with pytest.raises(DatasetValidationError, match="both labels.csv and train/labels.csv"):
        load_site_folder(tmp_path)


def test_binary_task_rejects_other_class_counts(tmp_path):
    _one_image_site(tmp_path, ["filename,label", "a.png,0"])
    with pytest.raises(ValueError, match="binary-class site folder has 2 classes"):
        load_site_folder(tmp_path, task="binary-class", num_classes=3)


@pytest.mark.parametrize("layout", ["one csv", "split folders"])
def test_an_image_listed_in_train_and_test_by_two_paths_is_refused(tmp_path, layout):
    # Prepare: the same file reached by two spellings of its path, once for training and once for testing.
    if layout == "one csv":
        _write_png(tmp_path / "images" / "a.png", _gray(0))
        _write_png(tmp_path / "images" / "b.png", _gray(1))
        _write_csv(tmp_path / "labels.csv", ["filename,label,split", "images/a.png,0,train", "images/b.png,1,train",
                                             "./images/a.png,0,test"])
    else:
        _write_png(tmp_path / "train" / "b.png", _gray(1))
        _write_png(tmp_path / "test" / "x.png", _gray(2))
        _write_csv(tmp_path / "train" / "labels.csv", ["filename,label", "b.png,1", "../test/x.png,0"])
        _write_csv(tmp_path / "test" / "labels.csv", ["filename,label", "x.png,0"])
    # Execute
    with pytest.raises(DatasetValidationError) as caught:
        load_site_folder(tmp_path)
    # Assert
    message = str(caught.value)
    assert "is listed twice" in message and "split train; here split test" in message


def test_a_png_with_a_gray_palette_is_grayscale(tmp_path):
    # Prepare: an 8-bit palette image whose palette holds only grays (some exporters write these).
    picture = Image.fromarray(_gray(0)).convert("P")
    picture.putpalette([v for g in range(256) for v in (g, g, g)])
    picture.save(tmp_path / "p.png")
    _write_csv(tmp_path / "labels.csv", ["filename,label", "p.png,0"])
    # Execute
    train = load_site_folder(tmp_path, in_chans=1)["train"]
    # Assert
    assert train.info.in_chans == 1 and train.images[0, ..., 0].tolist() == _gray(0).tolist()


def test_two_names_linked_to_one_stored_image_are_two_entries(tmp_path):
    # Prepare: a git-annex/DVC-style store keeps identical images once; the site lists two names.
    _write_png(tmp_path / "store" / "blob.png", _gray(0))
    _write_png(tmp_path / "images" / "other.png", _gray(1))
    for name in ("p1.png", "p2.png"):
        (tmp_path / "images" / name).symlink_to(tmp_path / "store" / "blob.png")
    _write_csv(tmp_path / "labels.csv", ["filename,label", "images/p1.png,0", "images/p2.png,0", "images/other.png,1"])
    # Execute / Assert
    assert len(load_site_folder(tmp_path)["train"]) == 3


def test_a_trailing_comma_after_every_cell_is_not_an_extra_cell(tmp_path):
    _one_image_site(tmp_path, ["filename,label", "a.png,0,", "b.png,1,"])
    assert load_site_folder(tmp_path)["train"].labels.tolist() == [0, 1]


def test_a_windows_path_in_the_csv_finds_the_image(tmp_path):
    # Excel or pandas on Windows write images\a.png; on Linux that is a file name with a backslash.
    _write_png(tmp_path / "images" / "a.png", _gray(0))
    _write_csv(tmp_path / "labels.csv", ["filename,label", "images\\a.png,1"])
    train = load_site_folder(tmp_path)["train"]
    assert train.images[0, ..., 0].tolist() == _gray(0).tolist()


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_gray_image_saved_as_rgb_is_grayscale_where_grayscale_is_asked_for(tmp_path, suffix):
    # DICOM converters often write gray X-rays as RGB PNG or JPEG: R = G = B, not "in colour".
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # smooth: JPEG keeps R = G = B
    Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB").save(tmp_path / f"a{suffix}")
    _write_png(tmp_path / "b.png", np.stack([gray, gray, 255 - gray], axis=-1))  # a colour image
    _write_csv(tmp_path / "labels.csv", ["filename,label", f"a{suffix},0"])
    train = load_site_folder(tmp_path, in_chans=1)["train"]
    assert train.info.in_chans == 1 and train.images.shape == (1, 16, 16, 1)
    if suffix == ".png":
        assert train.images[0, ..., 0].tolist() == gray.tolist()
    # A colour image is still refused, and a colour study still gets three channels.
    _write_csv(tmp_path / "labels.csv", ["filename,label", f"a{suffix},0", "b.png,1"])
    with pytest.raises(DatasetValidationError, match="1 of 2 images are in colour"):
        load_site_folder(tmp_path, in_chans=1)
    assert load_site_folder(tmp_path)["train"].images.shape == (2, 16, 16, 3)


def test_an_image_is_turned_upright_by_its_exif_orientation(tmp_path):
    # Prepare: stored pixels with a white band on top; EXIF orientation 6 (rotate 90 degrees
    # clockwise to view) puts it on the right, where the radiologist saw it.
    stored = np.zeros((8, 12), np.uint8)
    stored[:2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "a.png", exif=exif)
    _write_csv(tmp_path / "labels.csv", ["filename,label", "a.png,0"])
    # Execute
    image = load_site_folder(tmp_path)["train"].images[0, ..., 0]
    # Assert: 12 wide x 8 high becomes 8 wide x 12 high, the band on the right
    assert image.shape == (12, 8)
    assert (image[:, -2:] == 255).all() and (image[:, :-2] == 0).all()
