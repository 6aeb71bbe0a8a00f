"""See a federation before training it: a montage and a summary of every site.

:func:`preview_sites` builds every site of an experiment exactly as the simulated
ClientApps will (:func:`medfed.sites.profiles.build_site`) and writes

* ``sites.png``: one row per site; the columns are the same source training images
  (picked across the classes) passed through that site's profile (its patient-group
  draw, the group's and then the site's corruptions), so the rows differ only by the
  site; the row label gives the site's name, role and corruption chain;
* ``sites.json``: per site its sizes, class counts, group counts, corruption chain
  with severities, and the mean intensity and contrast (mean per-image standard
  deviation) of its training images, both in [0, 1];

and returns the summary so the CLI can print it as a table. The same config (and
seed) gives byte-identical files; no model, no network.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medfed._io import json_text, write_bytes_atomic
from medfed.sites.profiles import SiteSizeWarning, apply_profile, build_site, describe_chain, plan_for

if TYPE_CHECKING:
    from rich.table import Table

    from medfed.config import ExperimentConfig

__all__ = ["PREVIEW_IMAGE", "PREVIEW_JSON", "preview_run_sites", "preview_sites", "sites_table"]

PREVIEW_IMAGE = "sites.png"
PREVIEW_JSON = "sites.json"


def preview_run_sites(cfg: ExperimentConfig, run_dir: str | Path) -> None:
    """Write the site preview into a simulation's run directory when its sites have profiles.

    The report embeds ``RUN_DIR/sites.png``. Plain federations (no profiles, groups or
    quantity skew) get none: their sites differ by chance only. A :class:`SiteSizeWarning`
    is not said again here: the simulation's check before the run has said it.
    """
    if not plan_for(cfg).plain:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SiteSizeWarning)
            preview_sites(cfg, run_dir)


def _load_splits(cfg: ExperimentConfig):
    from medfed.data import DatasetSizeWarning, load_medmnist

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetSizeWarning)
        splits = load_medmnist(cfg.data.dataset, cfg.data.root, size=cfg.data.img_size)
    return splits["train"], splits["test"]


def _source_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` training indices taking the classes in turn (seeded)."""
    rng = np.random.default_rng(seed)
    labels = labels if labels.ndim == 1 else labels.argmax(axis=1)
    pools = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < count and any(pools):
        for pool in pools:
            if pool and len(picked) < count:
                picked.append(pool.pop(0))
    return np.array(picked, dtype=np.int64)


def _counts(values: np.ndarray | None, size: int) -> list[int]:
    if values is None:
        return []
    values = np.asarray(values)
    if values.ndim == 2:  # multi-label: positives per label
        return values.sum(axis=0).astype(int).tolist()
    return np.bincount(values[values >= 0], minlength=size).astype(int).tolist()


def _intensity_stats(images: np.ndarray) -> tuple[float | None, float | None]:
    """Mean intensity and mean per-image standard deviation, in [0, 1] (``None`` without
    pixels), without a float64 copy of the whole site: the mean from the exact integer sum,
    the standard deviations image by image, over chunks of ~1 MB of float64."""
    if images.size == 0:
        return None, None
    mean = float(images.sum(dtype=np.int64)) / images.size / 255.0
    flat = images.reshape(len(images), -1)
    step = max(1, (1 << 17) // flat.shape[1])
    stds = []
    for start in range(0, len(flat), step):
        pixels = flat[start:start + step].astype(np.float64)
        pixels /= 255.0
        stds.append(pixels.std(axis=1))
    return mean, float(np.concatenate(stds).mean())


def preview_sites(cfg: ExperimentConfig, out_dir: str | Path, *, images_per_site: int = 8) -> dict[str, Any]:
    """Build every site of ``cfg`` and write ``sites.png`` and ``sites.json`` to ``out_dir``.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment (dataset, federation, seed).
    out_dir : str or Path
        Created if missing.
    images_per_site : int
        Columns of the montage.

    Returns
    -------
    dict
        The content of ``sites.json``.

    Warns
    -----
    SiteSizeWarning
        Once, when a site holds under a quarter of its intended size
        (:func:`medfed.sites.profiles.deal_sites`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = _load_splits(cfg)
    plan = plan_for(cfg)
    info = train.info
    sources = train.subset(_source_indices(train.labels, images_per_site, cfg.seed))
    rows, row_groups, summaries = [], [], []
    for site in plan.sites:
        with warnings.catch_warnings():
            if site.partition_id:  # each site deals the whole federation: its SiteSizeWarning is said once, for site 0
                warnings.simplefilter("ignore", SiteSizeWarning)
            site_train, site_test = build_site(plan, site.partition_id, train, test, cfg.seed)
        # The montage row: the same source images through this site's profile.
        profiled = apply_profile(plan, site, sources, cfg.seed, split=2)
        rows.append(profiled.images)
        row_groups.append(profiled.groups)
        mean_intensity, contrast = _intensity_stats(site_train.images)
        summaries.append({
            "name": site.name,
            "partition_id": site.partition_id,
            "held_out": site.held_out,
            "train_size": len(site_train),
            "test_size": len(site_test),
            "class_counts_train": _counts(site_train.labels, info.num_classes),
            "class_counts_test": _counts(site_test.labels, info.num_classes),
            "group_counts_train": _counts(site_train.groups, len(plan.groups)),
            "group_counts_test": _counts(site_test.groups, len(plan.groups)),
            "corruptions": [[name, severity] for name, severity in site.corruptions],
            "mean_intensity": None if mean_intensity is None else round(mean_intensity, 4),
            "contrast": None if contrast is None else round(contrast, 4),
        })
    summary = {
        "dataset": cfg.data.dataset,
        "img_size": cfg.data.img_size,
        "seed": cfg.seed,
        "scenario": cfg.federation.scenario,
        "classes": [info.label_names.get(str(c), str(c)) for c in range(info.num_classes)],
        "groups": [{"name": g.name, "corruptions": [list(c) for c in g.corruptions]} for g in plan.groups],
        "sites": summaries,
    }
    write_bytes_atomic(out_dir / PREVIEW_JSON, (json_text(summary, indent=2) + "\n").encode("utf-8"))
    _write_montage(out_dir / PREVIEW_IMAGE, plan, rows, row_groups, sources, info)
    return summary


def _write_montage(path: Path, plan, rows: list[np.ndarray], row_groups: list[np.ndarray], sources, info) -> None:
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = len(sources)
    figure = Figure(figsize=(1.2 * columns + 3.2, 1.25 * len(rows) + 0.6))
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(rows), columns, squeeze=False)
    labels = sources.labels if sources.labels.ndim == 1 else sources.labels.argmax(axis=1)
    for row, (site, images, groups) in enumerate(zip(plan.sites, rows, row_groups)):
        for col in range(columns):
            axes = grid[row, col]
            image = images[col]
            if len(plan.groups) > 1:  # a group's corruptions show in its patients' images: say whose they are
                axes.set_xlabel(plan.groups[int(groups[col])].name, fontsize=6, labelpad=1)
            if image.shape[-1] == 1:
                axes.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                axes.imshow(image, interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(info.label_names.get(str(int(labels[col])), str(int(labels[col])))[:14], fontsize=7)
        role = " (held out)" if site.held_out else ""
        grid[row, 0].set_ylabel(
            f"{site.name}{role}\n{describe_chain(site.corruptions)}".replace(" > ", "\n> "),
            rotation=0, ha="right", va="center", fontsize=7,
        )
    figure.suptitle("The same training images through each site's profile", fontsize=9)
    figure.subplots_adjust(left=0.24, wspace=0.05, hspace=0.08)
    buffer = BytesIO()
    # No date or version in the PNG: the same config gives the same bytes.
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    write_bytes_atomic(path, buffer.getvalue())


def sites_table(summary: dict[str, Any]) -> Table:
    """The :func:`preview_sites` summary as a rich table (one row per site)."""
    from rich.table import Table

    table = Table(title=f"Sites of {summary['dataset']} ({summary['img_size']} px, seed {summary['seed']}"
                        + (f", scenario {summary['scenario']}" if summary.get("scenario") else "") + ")")
    corrupted_groups = [g for g in summary.get("groups", []) if g["corruptions"]]
    if corrupted_groups:  # a group's corruptions come on top of the site's, for that group's patients only
        table.caption = "Group corruptions (on top of the site's, for the group's patients): " + "; ".join(
            f"{g['name']}: {describe_chain([tuple(c) for c in g['corruptions']])}" for g in summary["groups"])
    for header in ("Site", "Role", "Train", "Test", "Classes (train)", "Groups (train)", "Site corruptions",
                   "Mean", "Contrast"):
        table.add_column(header, justify="left" if header in ("Site", "Role", "Site corruptions") else "right")
    for site in summary["sites"]:
        table.add_row(
            site["name"], "held out" if site["held_out"] else "trains", str(site["train_size"]), str(site["test_size"]),
            " / ".join(map(str, site["class_counts_train"])),
            " / ".join(map(str, site["group_counts_train"])) or "–",
            describe_chain([tuple(c) for c in site["corruptions"]]),
            "–" if site["mean_intensity"] is None else f"{site['mean_intensity']:.3f}",
            "–" if site["contrast"] is None else f"{site['contrast']:.3f}",
        )
    return table
