"""Site profiles (medfed.sites.profiles): scenarios, splits, groups, held-out sites, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.config import ConfigError, config_from_dict, list_scenarios, load_config
from medfed.data import ImageDataset, dataset_info
from medfed.sites.profiles import build_site, num_nodes, plan_federation, plan_for


def _splits(n_train: int = 200, n_test: int = 80, seed: int = 0):
    """Generated BreastMNIST-shaped splits: 28 px gray, 2 balanced classes."""
    info = dataset_info("breastmnist")
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.arange(n) % 2
        images = (rng.integers(60, 140, size=(n, 28, 28)) + 40 * labels[:, None, None]).astype(np.uint8)
        return ImageDataset(images, labels, info)

    return split(n_train), split(n_test)


def _sites(cfg, train, test):
    plan = plan_for(cfg)
    return plan, [build_site(plan, pid, train, test, cfg.seed) for pid in range(len(plan.sites))]


def test_every_shipped_scenario_loads_and_plans(tmp_path):
    for name in list_scenarios():
        cfg = load_config(overrides=[f"federation.scenario={name}"])
        plan = plan_for(cfg)
        assert len(plan.sites) == num_nodes(cfg.federation) >= cfg.federation.num_sites
    assert {"iid", "label-skew", "quantity-skew", "scanner-shift", "scanner-and-label-shift",
            "group-shift", "unseen-hospital"} <= set(list_scenarios())


def test_experiment_keys_win_over_the_scenario():
    # Execute
    cfg = load_config(overrides=["federation.scenario=label-skew", "federation.dirichlet_alpha=5"])
    # Assert: the scenario sets partition and alpha 0.3; the experiment's alpha wins.
    assert cfg.federation.partition == "dirichlet" and cfg.federation.dirichlet_alpha == 5.0


def test_a_file_key_that_overrules_the_scenario_warns_in_one_line(tmp_path, capsys, tiny_root):
    # A copied config's `partition: iid` silently turned `scenario: label-skew` into IID sites.
    from medfed.cli import main

    path = tmp_path / "exp.yaml"
    path.write_text("federation: {scenario: label-skew, partition: iid, dirichlet_alpha: 0.3}\n")
    with pytest.warns(UserWarning) as caught:
        cfg = load_config(path)
    # Assert: the key that differs is named with its file and both values; the equal one is not.
    assert cfg.federation.partition == "iid"
    assert [str(w.message) for w in caught] == [
        f"federation.partition is iid ({path}), where scenario 'label-skew' sets dirichlet: the experiment's own "
        "keys win; remove the key to use the scenario's."
    ]
    # A --set is typed on purpose: no warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(path, ["federation.partition=iid"])
    # The CLI prints it as one line.
    assert main(["sites", "--config", str(path), "--set", "federation.num_sites=2", "--set", f"data.root={tiny_root}",
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"medfed: warning: {caught[0].message}"


def test_a_run_folders_config_is_not_merged_with_its_scenario_again(tmp_path, monkeypatch):
    # A run begun with a scenario file relative to its folder could not be resumed or
    # evaluated from anywhere else, and keys a --set had changed warned on every read.
    import warnings

    from medfed.config import from_run_config, save_config, to_run_config

    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "my.yaml").write_text(
        "num_sites: 2\nsites:\n  - {name: clean}\n  - {name: noisy, corruptions: [[gaussian_noise, 3]]}\n")
    monkeypatch.chdir(tmp_path / "study")
    first = load_config(overrides=["federation.scenario=my.yaml"])
    shifted = load_config(overrides=["federation.scenario=scanner-shift", "federation.num_sites=2"])
    save_config(first, tmp_path / "first.yaml")
    save_config(shifted, tmp_path / "shifted.yaml")
    monkeypatch.chdir(tmp_path)  # where my.yaml is not

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(tmp_path / "first.yaml", ["rounds=7"], run_folder=True).federation == first.federation
        assert load_config(tmp_path / "shifted.yaml", run_folder=True).federation == shifted.federation
        assert from_run_config(to_run_config(first)).federation == first.federation
    assert [site.name for site in plan_for(load_config(tmp_path / "first.yaml", run_folder=True)).sites] == [
        "clean", "noisy"]
    # A config.yaml copied as a template is an experiment again: its scenario is read and checked.
    with pytest.raises(ConfigError, match="must name a scenario"):
        load_config(tmp_path / "first.yaml")
    with pytest.warns(UserWarning, match="federation.num_sites is 2"):
        load_config(tmp_path / "shifted.yaml")


def test_same_seed_gives_identical_site_datasets_and_another_seed_others():
    # Prepare
    train, test = _splits()
    overrides = ["federation.scenario=scanner-and-label-shift"]
    cfg = load_config(overrides=overrides)
    # Execute
    _, first = _sites(cfg, train, test)
    _, again = _sites(load_config(overrides=overrides), train, test)
    _, other = _sites(load_config(overrides=overrides + ["seed=1"]), train, test)
    # Assert
    for (a_train, a_test), (b_train, b_test) in zip(first, again):
        np.testing.assert_array_equal(a_train.images, b_train.images)
        np.testing.assert_array_equal(a_train.labels, b_train.labels)
        np.testing.assert_array_equal(a_test.images, b_test.images)
    assert any(a[0].images.shape != b[0].images.shape or not np.array_equal(a[0].images, b[0].images)
               for a, b in zip(first, other))


def test_scanner_chain_changes_train_and_test_alike_and_the_clean_site_is_untouched():
    # Prepare
    train, test = _splits()
    cfg = load_config(overrides=["federation.scenario=scanner-shift"])
    plan, sites = _sites(cfg, train, test)
    plain_plan = plan_for(load_config(overrides=["federation.num_sites=4"]))
    # Execute / Assert: scanner-a has no chain; scanner-b adds noise and lowers contrast.
    assert plan.sites[0].corruptions == () and plan.sites[1].corruptions
    originals = {row.tobytes() for row in train.images.reshape(len(train), -1)}
    assert all(row.tobytes() in originals for row in sites[0][0].images.reshape(len(sites[0][0]), -1))
    for split in (0, 1):
        changed = sites[1][split].images.reshape(len(sites[1][split]), -1)
        assert not any(row.tobytes() in originals | {r.tobytes() for r in test.images.reshape(len(test), -1)}
                       for row in changed)
    assert sites[1][0].images.std() != pytest.approx(sites[0][0].images.std(), abs=0.5)
    assert plain_plan.plain and not plan.plain


def test_small_alpha_label_skew_gives_measurably_different_class_mixes():
    # Prepare
    train, test = _splits(400, 100)
    skewed = load_config(overrides=["federation.scenario=label-skew", "federation.dirichlet_alpha=0.1",
                                    "federation.num_sites=4"])
    even = load_config(overrides=["federation.num_sites=4", "federation.sites=[{}]"])  # non-plain, no skew
    # Execute
    fractions = {}
    for label, cfg in (("skewed", skewed), ("even", even)):
        _, sites = _sites(cfg, train, test)
        fractions[label] = [float(site_train.labels.mean()) for site_train, _ in sites]
    # Assert: class-1 fractions spread far apart under alpha 0.1, stay near 0.5 without skew.
    assert max(fractions["skewed"]) - min(fractions["skewed"]) > 0.5
    assert max(fractions["even"]) - min(fractions["even"]) < 0.1


def test_fixed_class_mix_and_quantity_ratios():
    # Prepare
    train, test = _splits(400, 100)
    cfg = load_config(overrides=[
        "federation.num_sites=2", "federation.sites=[{class_mix: [0.9, 0.1]}, {class_mix: [0.1, 0.9]}]",
    ])
    sized = load_config(overrides=["federation.num_sites=3", "federation.quantity_skew={ratios: [4, 2, 2]}"])
    # Execute
    _, mixed = _sites(cfg, train, test)
    _, sizes = _sites(sized, train, test)
    # Assert: hand-computed shares: class 0 -> 0.9 / (0.9 + 0.1) to site 0, so site 0 holds
    # 180 of class 0 and 20 of class 1; sizes 4:2:2 of 400 -> 200, 100, 100.
    assert np.bincount(mixed[0][0].labels, minlength=2).tolist() == [180, 20]
    assert [len(site_train) for site_train, _ in sizes] == [200, 100, 100]


def test_groups_are_drawn_per_site_mix_and_carry_their_own_appearance():
    # Prepare
    train, test = _splits(400, 100)
    cfg = load_config(overrides=["federation.scenario=group-shift"])
    # Execute
    plan, sites = _sites(cfg, train, test)
    # Assert: group-b fraction follows the site mix (0.2, 0.5, 0.8); only group b's images change
    # (the sites of this scenario have no scanner chain).
    fractions = [float((site_train.groups == 1).mean()) for site_train, _ in sites]
    assert fractions[0] < 0.35 < fractions[1] < 0.65 < fractions[2]
    assert all(site_test.groups is not None for _, site_test in sites)
    site_train = sites[1][0]
    originals = {row.tobytes() for row in train.images.reshape(len(train), -1)}
    unchanged = np.array([row.tobytes() in originals for row in site_train.images.reshape(len(site_train), -1)])
    np.testing.assert_array_equal(unchanged, site_train.groups == 0)
    assert [g.name for g in plan.groups] == ["group-a", "group-b"]


def test_held_out_sites_come_after_the_training_sites():
    cfg = load_config(overrides=["federation.scenario=unseen-hospital"])
    plan = plan_for(cfg)
    assert num_nodes(cfg.federation) == 5
    assert [s.held_out for s in plan.sites] == [False] * 4 + [True]
    assert plan.sites[-1].name == "unseen-hospital"


@pytest.mark.parametrize(("override", "message"), [
    ("federation.sites=[{corruptions: [[blur, 2]]}]", r"federation.sites\[0\].corruptions\[0\]"),
    ("federation.sites=[{corruptions: [[pixelate, 9]]}]", "int in 1..5"),
    ("federation.sites=[{colour: 1}]", "is not a site profile key"),
    ("federation.sites=[{group_mix: [1, 1]}]", "one proportion per patient group"),
    ("federation.quantity_skew={power: 1}", "power_law"),
    ("federation.quantity_skew={ratios: [1, 0, 1]}", r"ratios' must be numbers > 0 \(each site's share\)"),
    ("federation.scenario=scaner-shift", "did you mean 'scanner-shift'"),
])
def test_bad_profiles_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_class_mix_must_fit_the_dataset():
    # The key is the profile's own entry: 'federation.sites (site 2)' named no config key, and
    # site 2 used profile 0.
    cfg = config_from_dict({"federation": {"num_sites": 3, "sites": [{}, {"class_mix": [1, 1, 1]}]}})
    with pytest.raises(Exception, match=r"'federation.sites\[1\].class_mix' must give one weight per class"):
        plan_federation(cfg.federation, dataset="breastmnist", num_classes=2, channels=1, seed=0)
    gray = config_from_dict({"federation": {"sites": [{"name": "a"}, {"name": "b"}],
                                            "groups": ["a", {"name": "b", "corruptions": [["saturate", 1]]}]}})
    with pytest.raises(Exception, match=r"'federation.groups\[1\]' uses 'saturate'"):
        plan_federation(gray.federation, dataset="breastmnist", num_classes=2, channels=1, seed=0)


def test_site_names_that_stay_twice_after_suffixing_are_refused():
    # [a, a, a-1] became a-0, a-1, a-1: the second 'a-1' was left out as a stranger and the run waited 30 min.
    from medfed.sites.profiles import SiteProfileError

    cfg = config_from_dict({"federation": {"num_sites": 3, "sites": [{"name": "a"}, {"name": "a"}, {"name": "a-1"}]}})
    with pytest.raises(SiteProfileError, match="'federation.sites' gives two sites the name 'a-1'"):
        plan_federation(cfg.federation, dataset="breastmnist", num_classes=2, channels=1, seed=0)
    cycled = config_from_dict({"federation": {"num_sites": 4, "sites": [{"name": "a"}, {"name": "b"}]}})
    assert [site.name for site in plan_for(cycled).sites] == ["a-0", "b-1", "a-2", "b-3"]


@pytest.mark.parametrize("federation", [
    {"scenario": "scanner-and-label-shift"},
    {"sites": [{"class_mix": [1, 2] + [1] * 12}]},
])
def test_label_skew_on_multi_label_data_is_refused_not_dropped(federation):
    # ChestMNIST's sites were dealt by size only, their Dirichlet skew or class mix silently ignored.
    from medfed.sites.profiles import SiteProfileError

    cfg = config_from_dict({"data": {"dataset": "chestmnist"}, "federation": federation})
    with pytest.raises(SiteProfileError, match="chestmnist is multi-label: .* use partition 'iid' without class_mix"):
        plan_for(cfg)
    plan_for(config_from_dict({"data": {"dataset": "chestmnist"},
                               "federation": {"scenario": "scanner-shift"}}))  # sizes and scanners only: fine


def test_a_label_skew_that_starves_a_site_keeps_the_best_draw_and_warns():
    # Heavily imbalanced labels (10 % class 0) and 10 sites at alpha 0.1: no draw in 50 gives
    # every site a quarter of its size. The last draw was kept, silently; now the best, with a warning.
    from medfed.sites.profiles import SiteSizeWarning, split_sites

    labels = (np.arange(2000) % 10 != 0).astype(np.int64)
    cfg = load_config(overrides=["federation.num_sites=10", "federation.sites=[{}]", "federation.partition=dirichlet",
                                 "federation.dirichlet_alpha=0.05"])
    plan = plan_for(cfg)
    with pytest.warns(SiteSizeWarning, match=r"^No Dirichlet\(alpha=0.05\) label skew in 50 draws .* holds \d+ of 200 "):
        parts, _ = split_sites(plan, labels, seed=0)
    smallest = min(len(part) for part in parts)
    # The best of the 50 draws: no other draw's smallest site is larger.
    from medfed.sites import profiles

    weights = np.full(10, 0.1)
    prior = np.bincount(labels) / labels.size
    others = [min(len(p) for p in profiles.split_by_proportions(labels, profiles._shares(plan, weights, prior, a), 0))
              for a in range(50)]
    assert smallest == max(others)


def test_held_out_sites_without_evaluation_are_a_config_error():
    # fraction_evaluate 0 turned off every evaluation, the held-out sites' too, silently.
    with pytest.raises(ConfigError, match=r"^Config key 'federation.fraction_evaluate' is 0 \(no evaluation\), but "
                                          r"the federation has held-out sites"):
        load_config(overrides=["federation.scenario=unseen-hospital", "federation.fraction_evaluate=0"])
    load_config(overrides=["federation.scenario=scanner-shift", "federation.fraction_evaluate=0"])


def test_filling_empty_sites_takes_from_every_over_served_site_not_only_the_largest():
    # 150 sites under a power law (exponent 3) on BreastMNIST-sized splits: most sites' shares
    # round to no image, and each took one from the then largest site, which drained site 0
    # from ~130 intended test images to 2 (and from 454 training images to 315).
    from medfed.sites.profiles import SiteSizeWarning, deal_sites

    cfg = load_config(overrides=["federation.num_sites=150", "federation.quantity_skew={power_law: 3}"])
    plan = plan_for(cfg)
    train_labels, test_labels = np.arange(546) % 2, np.arange(156) % 2
    with pytest.warns(SiteSizeWarning) as caught:
        train_parts, test_parts = deal_sites(plan, train_labels, test_labels, seed=0)
    # Still far below its share, and said so, naming the site and its test images.
    assert [str(w.message) for w in caught] == [
        "Site site-0 gets 7 of the 130 test images its share intends (3 of 150 sites get under a quarter of "
        "theirs): the test split holds 156 images for 150 sites, and every site gets at least one. Simulate "
        "fewer sites for test splits of a useful size."
    ]
    for parts, n in ((train_parts, 546), (test_parts, 156)):
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
        assert min(len(part) for part in parts) == 1
    sizes = [len(part) for part in test_parts]
    # The 7 images left beyond one per site: site 0 (share 83 %) keeps them, not 2.
    assert sizes[0] == 156 - 149 and sizes[1:] == [1] * 149
    # Training: the donors keep about the same fraction of their intended size.
    weights = np.array([(i + 1) ** -3.0 for i in range(150)])
    intended = weights / weights.sum() * 546
    donors = [s for s in range(150) if len(train_parts[s]) >= 2]
    fractions = [len(train_parts[s]) / intended[s] for s in donors]
    assert len(train_parts[0]) >= 340 and max(fractions) - min(fractions) < 0.2


def test_fill_rule_is_the_largest_size_for_its_share_and_leaves_full_splits_alone():
    from medfed.sites.partition import _fill_empty_sites

    parts = [np.arange(10), np.arange(10, 14), np.array([], np.int64), np.array([], np.int64)]
    # Site 1 holds 4 for an intended 2 (twice its share), site 0 10 for 10: site 1 gives first.
    filled = _fill_empty_sites(parts, np.array([10.0, 2.0, 0.5, 0.5]))
    assert [len(p) for p in filled] == [10, 2, 1, 1] and filled[2].tolist() == [13] and filled[3].tolist() == [12]
    untouched = _fill_empty_sites(parts[:2], np.array([1.0, 1.0]))
    assert all(np.array_equal(a, b) for a, b in zip(untouched, parts[:2]))


def test_a_plain_dirichlet_split_that_leaves_sites_a_few_images_warns_like_a_profile_one():
    # Plain federations (no profiles) never redraw (their splits are pinned), and said nothing
    # when alpha 0.001 left 18 of 20 sites one training image each.
    import warnings

    from medfed.sites.profiles import SiteSizeWarning, deal_sites

    train_labels, test_labels = np.arange(546) % 2, np.arange(156) % 2
    plan = plan_for(load_config(overrides=["federation.num_sites=20", "federation.partition=dirichlet",
                                           "federation.dirichlet_alpha=0.001"]))
    assert plan.plain
    with pytest.warns(SiteSizeWarning) as caught:
        train_parts, _ = deal_sites(plan, train_labels, test_labels, seed=0)
    assert len(caught) == 1
    short = sum(len(part) < 546 / 20 / 4 for part in train_parts)
    assert str(caught[0].message) == (
        f"Dirichlet(alpha=0.001) label skew leaves {short} of 20 sites under a quarter of an equal share of the 546 "
        f"training images: site site-0 trains on {len(train_parts[0])} of 27. Raise federation.dirichlet_alpha or "
        "simulate fewer sites for sites of a useful size."
    )
    # Sites of a useful size (IID, or a mild skew) are dealt silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for overrides in ([], ["federation.partition=dirichlet", "federation.dirichlet_alpha=100"]):
            deal_sites(plan_for(load_config(overrides=overrides)), train_labels, test_labels, seed=0)
