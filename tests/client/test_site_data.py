"""Finding a site's data from its node config."""

from __future__ import annotations

import numpy as np
import pytest
from medfed.client.site_data import SiteDataError, derive_seed, load_site_data, site_identity


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
