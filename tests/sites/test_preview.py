"""The site preview (medfed sites): montage and summary, seeded."""

from __future__ import annotations

import json

from medfed.cli import main
from medfed.config import load_config
from medfed.sites.preview import preview_sites


def test_preview_renders_montage_and_summary_and_repeats_byte_for_byte(tiny_root, tmp_path):
    # Prepare: the tiny data has 24 training images; 2 sites with shift, 1 held out, 2 groups.
    overrides = [
        f"data.root={tiny_root}", "federation.num_sites=2", "federation.groups=[a, b]",
        "federation.sites=[{corruptions: [[gaussian_noise, 3]]}, {group_mix: [1, 0]}, {held_out: true, name: new}]",
    ]
    cfg = load_config(overrides=overrides)
    # Execute
    summary = preview_sites(cfg, tmp_path / "one", images_per_site=4)
    preview_sites(load_config(overrides=overrides), tmp_path / "two", images_per_site=4)
    preview_sites(load_config(overrides=overrides + ["seed=3"]), tmp_path / "three", images_per_site=4)
    # Assert
    png = (tmp_path / "one" / "sites.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert png == (tmp_path / "two" / "sites.png").read_bytes()
    assert (tmp_path / "one" / "sites.json").read_bytes() == (tmp_path / "two" / "sites.json").read_bytes()
    assert (tmp_path / "one" / "sites.json").read_bytes() != (tmp_path / "three" / "sites.json").read_bytes()
    on_disk = json.loads((tmp_path / "one" / "sites.json").read_text())
    assert on_disk == summary
    sites = summary["sites"]
    assert [s["name"] for s in sites] == ["site-0", "site-1", "new"] and sites[2]["held_out"] is True
    assert sum(s["train_size"] for s in sites) == 24
    assert sites[0]["corruptions"] == [["gaussian_noise", 3]]
    assert sites[1]["group_counts_train"][1] == 0 and sum(sites[1]["group_counts_train"]) == sites[1]["train_size"]
    assert sites[0]["contrast"] > sites[1]["contrast"]  # noise raises the per-image spread


def test_cli_sites_prints_a_table_and_writes_files(tiny_root, tmp_path, capsys):
    # Execute
    code = main(["sites", "--set", f"data.root={tiny_root}", "--set", "federation.scenario=scanner-shift",
                 "--out", str(tmp_path)])
    # Assert
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "sites.png").is_file() and (tmp_path / "sites.json").is_file()
    assert "scanner-b" in out and "gaussian_noise:2" in out


def test_cli_sites_names_the_corruptions_of_patient_groups(tiny_root, tmp_path, capsys):
    # group-shift: the sites have no corruption of their own; group b's images are degraded.
    code = main(["sites", "--set", f"data.root={tiny_root}", "--set", "federation.scenario=group-shift",
                 "--out", str(tmp_path)])
    out = " ".join(capsys.readouterr().out.split())  # the table's caption wraps
    assert code == 0
    assert "Group corruptions (on top of the site's, for the group's patients): group-a: none; group-b: contrast_down:3" in out


def test_cli_sites_bad_profile_is_one_line_error(tmp_path, capsys):
    code = main(["sites", "--set", "federation.sites=[{corruptions: [[nope, 1]]}]", "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_sites_says_a_site_size_warning_once_not_once_per_site(tmp_path, capsys):
    # Every site deals the whole federation again; 20 sites said nothing (plain Dirichlet had
    # no warning), and a profile federation's warning was left to Python's once-per-place filter.
    code = main(["sites", "--set", "federation.num_sites=20", "--set", "federation.partition=dirichlet",
                 "--set", "federation.dirichlet_alpha=0.001", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0
    assert [line for line in err.splitlines() if line.startswith("medfed: warning:")] == [
        line for line in err.splitlines() if "label skew leaves" in line
    ] and err.count("medfed: warning:") == 1


def test_intensity_stats_of_a_site_match_its_float64_pixels_without_copying_them():
    import numpy as np

    from medfed.sites.preview import _intensity_stats

    images = np.random.default_rng(0).integers(0, 256, size=(90, 64, 64), dtype=np.uint8)  # several chunks
    pixels = images.astype(np.float64) / 255.0
    mean, contrast = _intensity_stats(images)
    assert abs(mean - pixels.mean()) < 1e-12
    assert contrast == pixels.reshape(len(pixels), -1).std(axis=1).mean()
    assert _intensity_stats(images[:0]) == (None, None)
