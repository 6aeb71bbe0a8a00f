"""Finding a site's data from its node config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfed.client.site_data import SiteDataError, StudyMismatchError, derive_seed, load_site_data, site_identity


def test_simulated_sites_partition_the_training_split_exactly(tiny_root, tiny_config, tmp_path):
    # Prepare
    cfg = tiny_config(tiny_root, tmp_path)
    # Execute
    sites = [load_site_data({"partition-id": i, "num-partitions": 3}, i + 10, cfg) for i in range(3)]
    # Assert: 24 training images -> 8 per site, 12 test images -> 4 per site, no image twice.
    assert [len(s.train) for s in sites] == [8, 8, 8]
    assert [len(s.test) for s in sites] == [4, 4, 4]
    train_images = np.concatenate([s.train.images for s in sites]).reshape(24, -1)
    assert len({row.tobytes() for row in train_images}) == 24
    assert [s.name for s in sites] == ["site-0", "site-1", "site-2"]
    assert [s.key for s in sites] == [0, 1, 2]


def test_simulated_sites_leave_the_site_size_warning_to_the_check_before_the_run(tiny_root, tiny_config, tmp_path):
    # Each site deals the whole federation, so a starved site's SiteSizeWarning was said once per
    # site (four times in a 10-site in-process run); medfed simulate's check before the run
    # (deal_sites) says it once.
    import warnings

    from medfed.client.site_data import load_dataset_once
    from medfed.sites.profiles import SiteSizeWarning, deal_sites, plan_for

    # 2 classes under alpha 0.01 fill about 2 of the 6 sites in every draw.
    cfg = tiny_config(tiny_root, tmp_path, federation={"num_sites": 6, "partition": "dirichlet",
                                                       "dirichlet_alpha": 0.01, "sites": [{}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sites = [load_site_data({"partition-id": i, "num-partitions": 6}, i + 10, cfg) for i in range(6)]
    assert sum(len(s.train) for s in sites) == 24
    splits = load_dataset_once("breastmnist", str(tiny_root), 28)
    with pytest.warns(SiteSizeWarning, match="label skew in 50 draws gave every site a quarter"):
        deal_sites(plan_for(cfg), splits["train"].labels, splits["test"].labels, cfg.seed)


def test_partition_is_the_same_in_every_call(tiny_root, tiny_config, tmp_path):
    # Prepare
    cfg = tiny_config(tiny_root, tmp_path)
    node = {"partition-id": 1, "num-partitions": 3}
    # Execute
    first = load_site_data(node, 5, cfg)
    from medfed.client import site_data

    site_data._simulated_site.cache_clear()  # recompute instead of reading the per-process cache
    again = load_site_data(node, 5, cfg)
    # Assert
    np.testing.assert_array_equal(first.train.images, again.train.images)
    np.testing.assert_array_equal(first.test.labels, again.test.labels)


def test_deployed_site_reads_its_data_path_and_site_name(tiny_root, tiny_config, tmp_path):
    # Prepare
    cfg = tiny_config(tiny_root, tmp_path)
    # Execute
    site = load_site_data({"data-path": str(tiny_root), "site-name": "hospital-a"}, 42, cfg)
    # Assert: the whole file is this site's data.
    assert (len(site.train), len(site.test)) == (24, 12)
    assert site.name == "hospital-a"


def test_site_identity_falls_back_to_the_node_id():
    # Execute
    name, key = site_identity({}, 123)
    # Assert
    assert (name, key) == ("node-123", 123)


def test_derive_seed_depends_on_every_key():
    # Execute
    seeds = {derive_seed(0, r, s) for r in (1, 2) for s in (0, 1)}
    # Assert
    assert len(seeds) == 4
    assert derive_seed(0, 1, 0) == derive_seed(0, 1, 0)


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, "names no data"),
        ({"partition-id": 0, "num-partitions": 5}, "splits the data into 5 partitions but"),
        ({"partition-id": 3, "num-partitions": 3}, "'partition-id' must be in [0, 3). Got 3"),
    ],
)
def test_bad_node_configs_raise_one_line_errors(tiny_root, tiny_config, tmp_path, node_config, message):
    # Prepare
    cfg = tiny_config(tiny_root, tmp_path)
    # Execute
    with pytest.raises(SiteDataError) as info:
        load_site_data(node_config, 7, cfg)
    # Assert
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_another_datasets_file_is_named_not_taken_for_a_site_folder(tiny_root, tiny_config, tmp_path):
    # A hospital gave the folder of another MedMNIST file: the error said the folder held
    # neither labels.csv nor train/ val/ test/.
    cfg = tiny_config(tiny_root, tmp_path)
    other = tmp_path / "pneu"
    other.mkdir()
    (other / "pneumoniamnist.npz").write_bytes((tiny_root / "breastmnist.npz").read_bytes())
    with pytest.raises(StudyMismatchError, match=r"holds pneumoniamnist.npz but this study needs breastmnist at 28 "
                                                 r"px \(breastmnist.npz\)") as info:
        load_site_data({"data-path": str(other), "site-name": "hospital-a"}, 7, cfg)
    # The server is told which data, not the site's file names.
    assert info.value.reason == ("the site holds MedMNIST pneumoniamnist at 28 px but this study needs breastmnist at "
                                 "28 px (breastmnist.npz)")


def test_a_stray_npz_beside_a_site_folder_is_neither_named_nor_in_the_way(tiny_root, tiny_config, tmp_path):
    # A backup file of the site's own naming took the "another dataset's file" branch, and
    # its name went to the server.
    cfg = tiny_config(tiny_root, tmp_path)
    folder = _write_site_folder(tmp_path / "site", 28, 1)
    (folder / "ward7_jsmith_breastmnist_backup.npz").write_bytes(b"not read")
    site = load_site_data({"data-path": str(folder)}, 1, cfg)
    assert len(site.train) == 4


def _write_site_folder(root: Path, size: int, channels: int, top_label: int = 1) -> Path:
    """A site folder (single labels.csv with a split column) of 4 train + 2 test PNGs,
    labelled 0, 1, ..., the last one ``top_label``."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["filename,label,split"]
    shape = (size, size) if channels == 1 else (size, size, channels)
    for i, split in enumerate(["train"] * 4 + ["test"] * 2):
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        lines.append(f"{i}.png,{top_label if i == 5 else i % 2},{split}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_site_folder_matching_the_experiment_loads(tiny_root, tiny_config, tmp_path):
    cfg = tiny_config(tiny_root, tmp_path)
    site = load_site_data({"data-path": str(_write_site_folder(tmp_path / "site", 28, 1))}, 1, cfg)
    assert site.train.images.shape == (4, 28, 28, 1) and len(site.test) == 2


@pytest.mark.parametrize(
    ("size", "channels", "fragments"),
    [
        (28, 3, ["6 of 6 images are in colour where grayscale ones are needed: ", "and 1 more; save them as grayscale.",
                 "The study's dataset breastmnist is grayscale."]),
        (64, 1, ["holds 64x64 px images", "data.img_size is 28", "resize the images to 28x28"]),
    ],
)
def test_site_folder_unlike_the_experiment_is_refused(tiny_root, tiny_config, tmp_path, size, channels, fragments):
    # Prepare: a BreastMNIST (1 channel, 28 px) experiment and a site folder that differs
    cfg = tiny_config(tiny_root, tmp_path)
    folder = _write_site_folder(tmp_path / "site", size, channels)
    # Execute
    with pytest.raises(SiteDataError) as info:
        load_site_data({"data-path": str(folder)}, 1, cfg)
    # Assert
    message = str(info.value)
    assert str(folder) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    ("size", "channels", "top_label", "reason"),
    [
        (28, 3, 1, "the site holds 6 of 6 images in colour but the study's dataset breastmnist is grayscale"),
        (64, 1, 1, "the site holds 64x64 px images (width x height) but the study's data.img_size is 28"),
        (28, 1, 5, "the site's images have 1 label(s) above 1 but the study's dataset breastmnist is binary-class "
                   "with 2 classes (labels 0 to 1)"),
    ],
)
def test_what_does_not_fit_the_study_is_said_without_the_sites_paths(
    tiny_root, tiny_config, tmp_path, size, channels, top_label, reason
):
    # Only the run's config tells these apart from a good folder; the server is told what
    # differs (StudyMismatchError.reason), never where the site keeps its images.
    cfg = tiny_config(tiny_root, tmp_path)
    folder = _write_site_folder(tmp_path / "hospital-b" / "ward-7", size, channels, top_label)
    with pytest.raises(StudyMismatchError) as info:
        load_site_data({"data-path": str(folder)}, 1, cfg)
    assert info.value.reason == reason
    assert "ward-7" in str(info.value) and "\n" not in str(info.value)
    import pickle

    again = pickle.loads(pickle.dumps(info.value))  # it crosses process boundaries in simulation
    assert (str(again), again.reason) == (str(info.value), reason)


def test_a_few_colour_images_among_gray_ones_are_named(tiny_root, tiny_config, tmp_path):
    # One screenshot among a ward's gray scans: "holds 3-channel images" did not say which.
    cfg = tiny_config(tiny_root, tmp_path)
    folder = _write_site_folder(tmp_path / "site", 28, 1)
    screenshot = np.zeros((28, 28, 3), dtype=np.uint8)
    screenshot[..., 0] = 200  # red: in colour (an RGB file of a gray image would count as gray)
    Image.fromarray(screenshot).save(folder / "3.png")
    with pytest.raises(StudyMismatchError) as info:
        load_site_data({"data-path": str(folder)}, 1, cfg)
    assert f"1 of 6 images are in colour where grayscale ones are needed: {folder / '3.png'}; " in str(info.value)
    assert info.value.reason == "the site holds 1 of 6 images in colour but the study's dataset breastmnist is grayscale"


@pytest.mark.parametrize(
    ("flag", "labels", "reason"),
    [
        ("chestmnist", ["0", "1"], "the site's images have labels of 1 values but the study's dataset chestmnist is "
                                   "multi-label with 14 values per label (0 or 1 each, such as '0;1;0')"),
        ("chestmnist", ["0", "5"], "the site's images have labels that are not 0/1 values but the study's dataset chestmnist is "
                                   "multi-label with 14 values per label (0 or 1 each, such as '0;1;0')"),
        ("breastmnist", ["0;1", "1;0"], "the site's images have labels that are not class indices but the study's dataset "
                                        "breastmnist is binary-class with 2 classes (labels 0 to 1)"),
        # A record number in the label column: the server learns how many, never the value.
        ("breastmnist", ["0", "31415926"], "the site's images have 3 label(s) above 1 but the study's dataset "
                                           "breastmnist is binary-class with 2 classes (labels 0 to 1)"),
    ],
)
def test_labels_of_the_wrong_form_for_the_study_are_said_so(tiny_root, tiny_config, tmp_path, flag, labels, reason):
    # medfed client accepts both label forms before it knows the study: only the study tells.
    cfg = tiny_config(tiny_root, tmp_path, data={"dataset": flag, "root": str(tiny_root), "img_size": 28})
    folder = tmp_path / "site"
    folder.mkdir()
    lines = ["filename,label,split"]
    for i, split in enumerate(["train"] * 4 + ["test"] * 2):
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{labels[i % 2]},{split}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(StudyMismatchError) as info:
        load_site_data({"data-path": str(folder)}, 1, cfg)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("strategy", "groups", "refused"),
    [
        ({"name": "fairlora", "params": {"num_groups": 2}}, [], True),
        ({"name": "fairlora", "params": {"num_groups": 3}}, [], False),
        ({"name": "fedavg"}, ["a", "b"], True),
        ({"name": "fedavg"}, [], False),  # the study uses no groups: the site's are only counted
    ],
)
def test_patient_groups_outside_the_studys_are_refused(tiny_root, tiny_config, tmp_path, strategy, groups, refused):
    # Prepare: a site folder whose 'group' column holds 0, 1 and 2 (and -1, unknown).
    from dataclasses import replace

    from medfed.config import StrategyConfig

    folder = tmp_path / "ward-7"
    folder.mkdir()
    lines = ["filename,label,group,split"]
    for i, (group, split) in enumerate(zip([0, 1, 2, -1, 0, 1], ["train"] * 4 + ["test"] * 2)):
        Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{i % 2},{group},{split}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    base = tiny_config(tiny_root, tmp_path)
    cfg = replace(base, strategy=StrategyConfig(**strategy), federation=replace(base.federation, groups=groups))
    # Execute / Assert
    if not refused:
        assert len(load_site_data({"data-path": str(folder)}, 1, cfg).train) == 4
        return
    with pytest.raises(StudyMismatchError) as info:
        load_site_data({"data-path": str(folder)}, 1, cfg)
    assert info.value.reason == "the site holds patient group 2 but the study has 2 groups (0-1)"
    assert "ward-7" in str(info.value) and "\n" not in str(info.value)
