"""Which images a site trains and evaluates on, found from the node config.

The same ClientApp serves the simulation and the deployment; only the node config
differs:

* simulation: Flower sets ``partition-id`` and ``num-partitions``; the site takes its
  share of the configured MedMNIST dataset, built by :mod:`medfed.sites` from the
  experiment's federation (partition, site profile: corruptions, groups; pure NumPy,
  seeded, identical in every process) and cached per process;
* deployment: ``data-path`` names the site's data, either a folder holding the official
  ``{flag}.npz`` / ``{flag}_{size}.npz`` file or a site folder read by
  :func:`medfed.data.load_site_folder`. An optional ``site-name`` names the site in the
  server's logs and seeds its local randomness (set it so a resumed run repeats).

:mod:`medfed.sites` knows neither Flower nor torch: the client stays independent of how
a simulation is launched, while the maths of building sites lives in one place.
"""

from __future__ import annotations

import functools
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.errors import MedfedError
from medfed.config import ExperimentConfig
from medfed.data import DatasetInfo, DatasetSizeWarning, ImageDataset, load_medmnist
from medfed.data.info import MULTI_LABEL, normalize_task
from medfed.config import FederationConfig
from medfed.sites.profiles import SiteSizeWarning, build_site, num_nodes, plan_federation

__all__ = ["SiteData", "SiteDataError", "StudyMismatchError", "derive_seed", "load_dataset_once", "load_site_data", "site_identity", "site_role"]

# derive_seed and medfed.sites.profiles.site_seed must stay the same function: plain
# federations split exactly as before the sites package existed.

PARTITION_ID_KEY = "partition-id"
HELD_OUT_KEY = "held-out"
NUM_PARTITIONS_KEY = "num-partitions"
DATA_PATH_KEY = "data-path"
SITE_NAME_KEY = "site-name"
#: Node config: the plug-in strategies (``package.module:Class``) a deployed site runs,
#: separated by spaces (``medfed client --allow-strategy``).
ALLOWED_STRATEGIES_KEY = "allowed-strategies"
#: Node config: ``"false"`` when the site never sends its test scores' histograms
#: (``medfed client --no-pooled-test-metrics``).
POOLED_TEST_METRICS_KEY = "pooled-test-metrics"


class SiteDataError(MedfedError):
    """The node config does not say where this site's data is, or says it inconsistently."""


class StudyMismatchError(SiteDataError):
    """The site's data is readable but does not fit the study: another dataset, image size,
    channel count, or labels outside the study's classes.

    Only the run's config tells (``medfed client`` checks the folder before it knows the
    study), so this is found when the server asks (:class:`medfed.server.held_out.SiteRoster`).

    Attributes
    ----------
    reason : str
        What does not fit, naming no file or folder: the server and its coordinator are
        told this much, so they can tell the site what to fix.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # noqa: ANN204 - keyword-only arguments need their own pickling
        return _study_mismatch_error, (str(self), self.reason)


def _study_mismatch_error(message: str, reason: str) -> StudyMismatchError:
    return StudyMismatchError(message, reason=reason)


@dataclass(frozen=True)
class SiteData:
    """One site's training and test splits.

    Attributes
    ----------
    name : str
        Site name shown in the server's logs (never a path).
    key : int
        Stable integer identifying the site (partition id, or a CRC-32 of the name),
        mixed into the site's seeds.
    train, test : ImageDataset
        The site's splits; ``test`` is what federated evaluation reports on.
    held_out : bool
        The site never trains; it only evaluates the global model (an unseen
        hospital): a held-out profile in simulation, node config ``held-out=true``
        in deployment.
    """

    name: str
    key: int
    train: ImageDataset
    test: ImageDataset
    held_out: bool = False

    @property
    def info(self) -> DatasetInfo:
        """Task, number of outputs and channels of the site's data."""
        return self.train.info


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that depends on every key (NumPy's SeedSequence hashing).

    Used for per-round, per-site seeds: ``derive_seed(seed, server_round, site_key)``
    is the same in every process and differs between sites and rounds.
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def site_identity(node_config: Mapping[str, Any], node_id: int) -> tuple[str, int]:
    """Return ``(site name, site key)`` for a node.

    The name is the node config's ``site-name`` when set, else ``site-<partition-id>``
    in simulation, else ``node-<node id>``.
    """
    if SITE_NAME_KEY in node_config and str(node_config[SITE_NAME_KEY]).strip():
        name = str(node_config[SITE_NAME_KEY]).strip()
        return name, zlib.crc32(name.encode("utf-8"))
    if PARTITION_ID_KEY in node_config:
        partition_id = int(node_config[PARTITION_ID_KEY])
        return f"site-{partition_id}", partition_id
    return f"node-{node_id}", int(node_id) % 2**32


def policy_refusal(node_config: Mapping[str, Any], cfg: ExperimentConfig) -> str | None:
    """Why this site's operator keeps it out of the study, or None when nothing does.

    What the coordinator's config asks of a deployed site that its operator may refuse
    (``medfed client`` options; a simulated site runs on the researcher's machine and
    refuses nothing):

    - a plug-in strategy (an import path) runs its client half in the site's process,
      next to its images, and chooses what its replies carry: the site imports it only
      when its operator named it (``--allow-strategy``); medfed's registered strategies
      need no permission;
    - pooled test metrics send per-class histograms of the site's test scores, which for a
      small test split tell each image's label and score to within a bin: a site started
      with ``--no-pooled-test-metrics`` does not take part in a study that asks for them.

    The answer names no file, and may reach the server.
    """
    if not str(node_config.get(DATA_PATH_KEY, "")).strip():
        return None
    name = cfg.strategy.name
    if ":" in name and name not in str(node_config.get(ALLOWED_STRATEGIES_KEY, "")).split():
        return (f"the study uses the plug-in strategy {name!r}, whose code this site does not run unless its "
                f"operator allows it ('medfed client --allow-strategy {name}')")
    if cfg.federation.pooled_test_metrics and str(node_config.get(POOLED_TEST_METRICS_KEY, "")).lower() == "false":
        return ("the study asks for histograms of the sites' test scores (federation.pooled_test_metrics), which "
                "this site's operator does not send; set federation.pooled_test_metrics: false")
    return None


def site_role(node_config: Mapping[str, Any], node_id: int, cfg: ExperimentConfig) -> tuple[str, bool]:
    """``(site name, held out)`` of a node, without loading its images.

    A simulated site is held out when its partition id comes after the
    ``federation.num_sites`` training sites; a deployed one when its node config
    says ``held-out=true``.
    """
    name, _ = site_identity(node_config, node_id)
    if DATA_PATH_KEY in node_config and str(node_config[DATA_PATH_KEY]).strip():
        return name, str(node_config.get(HELD_OUT_KEY, "false")).strip().lower() in ("true", "1", "yes")
    if PARTITION_ID_KEY in node_config:
        from medfed.sites.profiles import plan_for

        partition_id = int(node_config[PARTITION_ID_KEY])
        plan = plan_for(cfg)
        if 0 <= partition_id < len(plan.sites):
            site = plan.sites[partition_id]
            return (name if SITE_NAME_KEY in node_config else site.name), site.held_out
    return name, False


def load_site_data(node_config: Mapping[str, Any], node_id: int, cfg: ExperimentConfig) -> SiteData:
    """Load the site's splits as the node config describes them.

    Parameters
    ----------
    node_config : Mapping
        ``context.node_config``: ``partition-id`` + ``num-partitions`` (simulation) or
        ``data-path`` (deployment), optionally ``site-name``.
    node_id : int
        ``context.node_id``, used to name a deployed site without ``site-name``.
    cfg : ExperimentConfig
        The experiment (dataset, image size, partitioner, seed).

    Returns
    -------
    SiteData

    Raises
    ------
    SiteDataError
        If the node config names no data, its partition count disagrees with the
        experiment's ``federation.num_sites``, or a site folder's images do not have the
        experiment's channels and ``data.img_size``.
    """
    name, key = site_identity(node_config, node_id)
    if DATA_PATH_KEY in node_config and str(node_config[DATA_PATH_KEY]).strip():
        train, test = _load_path(str(node_config[DATA_PATH_KEY]), cfg.data.dataset, cfg.data.img_size)
        held_out = str(node_config.get(HELD_OUT_KEY, "false")).strip().lower() in ("true", "1", "yes")
        _check_group_ids(str(node_config[DATA_PATH_KEY]), train, test, study_group_count(cfg))
        return SiteData(name=name, key=key, train=train, test=test, held_out=held_out)
    if PARTITION_ID_KEY in node_config:
        partition_id = int(node_config[PARTITION_ID_KEY])
        num_partitions = int(node_config.get(NUM_PARTITIONS_KEY, num_nodes(cfg.federation)))
        if num_partitions != num_nodes(cfg.federation):
            raise SiteDataError(
                f"The node config splits the data into {num_partitions} partitions but the experiment has "
                f"{num_nodes(cfg.federation)} sites ('federation.num_sites' plus held-out sites); make the number "
                "of simulated SuperNodes (options.num-supernodes) equal to that."
            )
        site_name, held_out, train, test = _simulated_site(
            cfg.data.dataset, cfg.data.root, cfg.data.img_size, cfg.federation, cfg.seed, partition_id,
        )
        if SITE_NAME_KEY not in node_config:
            name = site_name
        return SiteData(name=name, key=key, train=train, test=test, held_out=held_out)
    raise SiteDataError(
        f"The node config of node {node_id} names no data: give the SuperNode "
        "--node-config 'data-path=\"/path/to/site\"' (or run it in simulation, where Flower sets 'partition-id')."
    )


def study_group_count(cfg: ExperimentConfig) -> int:
    """The study's patient groups (:func:`medfed.strategies.registry.study_group_count`)."""
    from medfed.strategies.registry import study_group_count as count

    return count(cfg.federation.groups, cfg.strategy.name, cfg.strategy.params)


def _check_group_ids(path: str, train: ImageDataset, test: ImageDataset, num_groups: int) -> None:
    """Refuse patient-group ids outside the study's ``0 .. num_groups - 1`` (-1, unknown, is fine).

    FairLoRA would fail on them in every round, and other strategies would leave their
    images out of every per-group metric, silently.
    """
    if num_groups <= 0:
        return
    held = set()
    for split in (train, test):
        if split.groups is not None:
            held.update(int(g) for g in np.unique(split.groups) if g >= num_groups)
    if held:
        found = (f"patient group{'s' if len(held) > 1 else ''} {', '.join(map(str, sorted(held)))} but the study "
                 f"has {num_groups} group{'s' if num_groups > 1 else ''} (0-{num_groups - 1})")
        raise StudyMismatchError(
            f"The site data at {path} has {found}; recode the 'group' column of its labels.csv to the study's groups, or give the study "
            "more (federation.groups, or FairLoRA's strategy.params.num_groups).",
            reason=f"the site holds {found}",
        )


@functools.lru_cache(maxsize=4)
def load_dataset_once(flag: str, root: str | None, img_size: int) -> dict[str, ImageDataset]:
    """:func:`~medfed.data.load_medmnist`, cached: every simulated site of a process (and
    ``medfed simulate``'s check before the run) reads the same file once."""
    with warnings.catch_warnings():
        # A site's file may legitimately hold fewer samples than the official release.
        warnings.simplefilter("ignore", DatasetSizeWarning)
        return load_medmnist(flag, root, size=img_size)


@functools.lru_cache(maxsize=16)
def _simulated_site(
    flag: str, root: str | None, img_size: int, federation: FederationConfig, seed: int, partition_id: int,
) -> tuple[str, bool, ImageDataset, ImageDataset]:
    """``(name, held out, train, test)`` of simulated site ``partition_id`` (see :mod:`medfed.sites.profiles`)."""
    total = num_nodes(federation)
    if not 0 <= partition_id < total:
        raise SiteDataError(
            f"The node config's 'partition-id' must be in [0, {total}). Got {partition_id} instead."
        )
    splits = load_dataset_once(flag, root, img_size)
    train, test = splits["train"], splits["test"]
    plan = plan_federation(
        federation, dataset=flag, num_classes=train.info.num_classes, channels=train.info.in_chans, seed=seed,
        multi_label=normalize_task(train.info.task) == MULTI_LABEL,
    )
    # The test split is dealt with the training split's class shares, so a skewed site is
    # evaluated on data skewed like its own; its profile applies to both alike. Every site
    # deals the whole federation: a SiteSizeWarning would be said once per site (or per Ray
    # worker); medfed simulate's check before the run (deal_sites) has said it once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SiteSizeWarning)
        site_train, site_test = build_site(plan, partition_id, train, test, seed)
    site = plan.sites[partition_id]
    return site.name, site.held_out, site_train, site_test


@functools.lru_cache(maxsize=2)
def _load_path(data_path: str, flag: str, img_size: int) -> tuple[ImageDataset, ImageDataset]:
    path = Path(data_path).expanduser()
    from medfed.data import medmnist_filename, parse_medmnist_filename
    from medfed.data.site_folder import is_site_folder

    wanted = medmnist_filename(flag, img_size)
    official = {p.name: parse_medmnist_filename(p.name) for p in sorted(path.glob("*.npz"))}
    official = {name: flag_size for name, flag_size in official.items() if flag_size is not None}
    if (path / wanted).is_file():
        splits = load_dataset_once(flag, str(path), img_size)
    elif official and not is_site_folder(path):
        # MedMNIST files, but not this study's: say so, not "no labels.csv". The server
        # is told which data, not the file names (official ones here, but a site's all the same).
        study = f"this study needs {flag} at {img_size} px ({wanted})"
        found = ", ".join(f"{other} at {size} px" for other, size in official.values())
        raise StudyMismatchError(
            f"The site data at {path} holds {', '.join(official)} but {study}; give the folder that holds {wanted}.",
            reason=f"the site holds MedMNIST {found} but {study}",
        )
    else:
        from medfed.data import dataset_info, load_site_folder
        from medfed.data.errors import ColourImagesError, LabelRangeError

        info = dataset_info(flag)
        try:
            splits = load_site_folder(path, task=info.task, num_classes=info.num_classes, flag=flag,
                                      in_chans=info.in_chans)
        except ColourImagesError as error:
            raise StudyMismatchError(
                f"{error} The study's dataset {flag} is grayscale.",
                reason=f"the site holds {error.detail} but the study's dataset {flag} is grayscale",
            ) from None
        except LabelRangeError as error:
            study = _label_words(info)
            raise StudyMismatchError(
                f"{error} The study's dataset {flag} is {study}; relabel the site's images to fit.",
                reason=f"the site's images have {error.detail} but the study's dataset {flag} is {study}",
            ) from None
        # The .npz file is checked against flag and size when read; a site folder takes
        # both from its images, so compare them with what the model is built for.
        _check_site_folder_images(path, splits, flag, info.in_chans, img_size)
    if "train" not in splits or len(splits["train"]) == 0:
        raise SiteDataError(f"The site data at {path} has no training images; add a 'train' split.")
    test = splits.get("test") or splits.get("val")
    if test is None or len(test) == 0:
        raise SiteDataError(f"The site data at {path} has no 'test' (or 'val') images to evaluate on; add one.")
    return splits["train"], test


def _label_words(info: DatasetInfo) -> str:
    """The labels a study takes, in words: ``binary-class with 2 classes (labels 0 to 1)``."""
    if info.task == MULTI_LABEL:
        return f"multi-label with {info.num_classes} values per label (0 or 1 each, such as '0;1;0')"
    return f"{info.task} with {info.num_classes} classes (labels 0 to {info.num_classes - 1})"


def _check_site_folder_images(
    path: Path, splits: Mapping[str, ImageDataset], flag: str, in_chans: int, img_size: int,
) -> None:
    """Raise SiteDataError unless a site folder's images have the experiment's channels and size.

    Otherwise wrong channels fail at the model's first forward with a raw RuntimeError,
    and a wrong size trains silently on images unlike the other sites'.
    """
    for dataset in splits.values():
        _, height, width, channels = dataset.images.shape
        if channels != in_chans:
            kind = "grayscale" if in_chans == 1 else "RGB"
            found = f"{channels}-channel images but the study's dataset {flag} has {in_chans} channel{'s' if in_chans > 1 else ''}"
            raise StudyMismatchError(
                f"The site folder {path} holds {found}; save the images as {kind}.", reason=f"the site holds {found}",
            )
        if (height, width) != (img_size, img_size):
            found = f"{width}x{height} px images (width x height) but the study's data.img_size is {img_size}"
            raise StudyMismatchError(
                f"The site folder {path} holds {found}; resize the images to {img_size}x{img_size}.",
                reason=f"the site holds {found}",
            )
