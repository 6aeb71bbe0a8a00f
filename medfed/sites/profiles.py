"""Site profiles: how each simulated hospital differs, and the site datasets they produce.

A federation (the experiment's ``federation`` section, or a named scenario that fills
it) is described by

* ``num_sites`` training sites and, per site, a **profile** (``federation.sites``,
  assigned in order and cycled when there are more sites than profiles):

  - ``name``: shown in logs and reports (default ``site-<partition id>``);
  - ``corruptions``: the **acquisition shift**, a chain of corruptions applied in order
    to the site's training and test images alike, as a scanner would: a list of
    ``[name, severity]`` pairs (names from :func:`medfed.sites.corruptions.list_corruptions`,
    severity 1..5), or ``{random: K, severity: [low, high]}`` to draw K of the dataset's
    MedMNIST-C corruptions with severities in that range (seeded per site);
  - ``class_mix``: a fixed class mix (one weight per class) for **label skew**;
  - ``size``: a relative size for **quantity skew** (overrides ``quantity_skew``);
  - ``group_mix``: the proportions of the federation's patient groups at this site;
  - ``held_out: true``: an extra site that never trains and only evaluates the global
    model (an unseen hospital). Held-out profiles are not cycled: each is one site,
    with partition ids after the training sites.

* ``partition`` / ``dirichlet_alpha``: Dirichlet **label skew** for the training sites
  without a ``class_mix`` (Hsu et al., 2019; see :mod:`medfed.sites.partition`);
  held-out sites without one get the dataset's class mix;
* ``quantity_skew``: ``{ratios: [r_0, r_1, ...]}`` (cycled) or ``{power_law: a}``
  (site ``i`` gets a share proportional to ``(i + 1) ** -a``); held-out sites get the
  mean share of the training sites unless their profile sets ``size``;
* ``groups``: **patient groups**, e.g. ``[female, male]`` or
  ``[{name: older, corruptions: [[contrast_down, 2]]}]``: every sample of a site draws
  a group from the site's ``group_mix`` (default: equal), and a group's own corruptions
  (its appearance shift) are applied before the site's chain.

How the split is made: class ``c``'s samples are dealt to the sites in shares
``w_s * m_s[c]`` normalised over the sites, where ``w_s`` is the site's size weight and
``m_s`` its class mix (its Dirichlet draw under label skew; the dataset's class
frequencies otherwise). Every sample is dealt, so ``class_mix`` is a site's weight for
each class relative to the other sites', not its composition: on training labels that
are 10 % class 0, two sites with ``[0.8, 0.2]`` and ``[0.2, 0.8]`` hold 31 % and 3 %
class 0 (and 1009 and 2873 images). Under Dirichlet label skew the shares are
drawn again (next seeds, up to 50 times) until every site holds at least a quarter of
its intended size (a site of five images is no hospital); when no draw does, the best
one is kept with a :class:`SiteSizeWarning`. The test split is dealt with the training
split's shares. Multi-label data (ChestMNIST) is dealt by size only: label skew on it is
refused. A site whose share rounds to no image gets one from the site that holds the most
for its share (:func:`medfed.sites.partition._fill_empty_sites`).
Without profiles, groups or quantity skew, the split is exactly the plain
:func:`medfed.sites.partition.partition_labels` one (no redraws). Either way, a site left
under a quarter of its intended size (a plain Dirichlet split's equal share; a test split
with nearly as many sites as images) is named in a :class:`SiteSizeWarning`
(:func:`deal_sites`). Everything is seeded by the experiment seed: the same seed gives the
same site datasets in every process.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from medfed.errors import MedfedError, MedfedWarning
from medfed.sites.corruptions import CorruptionError, check_corruption, corrupt, default_corruptions
from medfed.sites.partition import (
    PartitionError, _fill_empty_sites, dirichlet_proportions, expected_sizes, partition_labels, split_by_proportions,
)

if TYPE_CHECKING:
    from medfed.config import ExperimentConfig, FederationConfig
    from medfed.data import ImageDataset

__all__ = [
    "FederationPlan",
    "GroupSpec",
    "SitePlan",
    "SiteProfile",
    "SiteProfileError",
    "SiteSizeWarning",
    "apply_profile",
    "deal_sites",
    "build_site",
    "check_federation_profiles",
    "describe_chain",
    "num_held_out",
    "num_nodes",
    "plan_federation",
    "plan_for",
    "site_seed",
    "split_sites",
]

_PROFILE_KEYS = ("name", "corruptions", "class_mix", "size", "group_mix", "held_out")
Chain = tuple[tuple[str, int], ...]


class SiteProfileError(MedfedError):
    """A site profile, patient group or quantity skew is malformed."""


class SiteSizeWarning(MedfedWarning):
    """A site holds under a quarter of the images it is meant to hold (see :func:`deal_sites`).

    Said by :func:`deal_sites` (and :func:`split_sites` for a profile federation's
    Dirichlet draws), once per federation: ``medfed simulate`` says it before the run,
    ``medfed sites`` for its first site; simulated sites building their share stay quiet.
    """


def site_seed(*keys: int) -> int:
    """A 32-bit seed depending on every key (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


# ----------------------------------------------------------------------------------
# Parsing (from the config's JSON-like values)
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupSpec:
    """A patient group: its name and its own appearance shift (a corruption chain)."""

    name: str
    corruptions: Chain = ()


@dataclass(frozen=True)
class SiteProfile:
    """One profile of ``federation.sites`` as written (see the module docstring)."""

    name: str | None = None
    corruptions: Chain = ()
    random_corruptions: int = 0
    severity_range: tuple[int, int] = (1, 3)
    class_mix: tuple[float, ...] | None = None
    size: float | None = None
    group_mix: tuple[float, ...] | None = None
    held_out: bool = False


def _fail(where: str, message: str) -> SiteProfileError:
    return SiteProfileError(f"Config key {where!r} {message}")


def _parse_chain(value: Any, where: str) -> Chain:
    if not isinstance(value, list):
        raise _fail(where, f"must be a list of [name, severity] pairs. Got {value!r}.")
    chain = []
    for index, item in enumerate(value):
        if isinstance(item, Mapping):
            name, severity = item.get("name"), item.get("severity")
        elif isinstance(item, list) and len(item) == 2:
            name, severity = item
        else:
            raise _fail(f"{where}[{index}]", f"must be [name, severity] or {{name, severity}}. Got {item!r}.")
        try:
            chain.append(check_corruption(name, severity))
        except CorruptionError as error:
            raise _fail(f"{where}[{index}]", f"is not a corruption: {error}") from None
    return tuple(chain)


def _parse_weights(value: Any, where: str) -> tuple[float, ...]:
    if (
        not isinstance(value, list) or not value
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in value)
        or sum(value) <= 0
    ):
        raise _fail(where, f"must be a non-empty list of numbers >= 0 with a positive sum. Got {value!r}.")
    return tuple(float(v) for v in value)


def _parse_profile(value: Any, where: str) -> SiteProfile:
    if not isinstance(value, Mapping):
        raise _fail(where, f"must be a mapping with keys among {', '.join(_PROFILE_KEYS)}. Got {value!r}.")
    unknown = sorted(set(value) - set(_PROFILE_KEYS))
    if unknown:
        raise _fail(f"{where}.{unknown[0]}", f"is not a site profile key; use {', '.join(_PROFILE_KEYS)}.")
    kwargs: dict[str, Any] = {}
    if value.get("name") is not None:
        if not isinstance(value["name"], str) or not value["name"].strip():
            raise _fail(f"{where}.name", f"must be a non-empty str. Got {value['name']!r}.")
        kwargs["name"] = value["name"].strip()
    corruptions = value.get("corruptions")
    if isinstance(corruptions, Mapping):
        count, severity = corruptions.get("random"), corruptions.get("severity", [1, 3])
        if set(corruptions) - {"random", "severity"} or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise _fail(f"{where}.corruptions", f"as a mapping must be {{random: K, severity: [low, high]}}. Got {corruptions!r}.")
        if (not isinstance(severity, list) or len(severity) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 5 for s in severity)
                or severity[0] > severity[1]):
            raise _fail(f"{where}.corruptions.severity", f"must be [low, high] with 1 <= low <= high <= 5. Got {severity!r}.")
        kwargs["random_corruptions"], kwargs["severity_range"] = count, (severity[0], severity[1])
    elif corruptions is not None:
        kwargs["corruptions"] = _parse_chain(corruptions, f"{where}.corruptions")
    for key in ("class_mix", "group_mix"):
        if value.get(key) is not None:
            kwargs[key] = _parse_weights(value[key], f"{where}.{key}")
    if value.get("size") is not None:
        size = value["size"]
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not (math.isfinite(size) and size > 0):
            raise _fail(f"{where}.size", f"must be a number > 0. Got {size!r}.")
        kwargs["size"] = float(size)
    if value.get("held_out") is not None:
        if not isinstance(value["held_out"], bool):
            raise _fail(f"{where}.held_out", f"must be true or false. Got {value['held_out']!r}.")
        kwargs["held_out"] = value["held_out"]
    return SiteProfile(**kwargs)


def _parse_groups(value: list[Any]) -> tuple[GroupSpec, ...]:
    groups = []
    for index, item in enumerate(value):
        where = f"federation.groups[{index}]"
        if isinstance(item, str) and item.strip():
            groups.append(GroupSpec(item.strip()))
        elif isinstance(item, Mapping) and isinstance(item.get("name"), str) and item["name"].strip():
            if set(item) - {"name", "corruptions"}:
                raise _fail(where, f"may only have the keys 'name' and 'corruptions'. Got {sorted(item)}.")
            groups.append(GroupSpec(item["name"].strip(), _parse_chain(item.get("corruptions", []), f"{where}.corruptions")))
        else:
            # A YAML file reads an unquoted yes, no, on or off as a boolean.
            hint = " (quote a name such as \"no\": YAML reads it unquoted as a boolean)" if isinstance(item, bool) else ""
            raise _fail(where, f"must be a group name or {{name, corruptions}}. Got {item!r}{hint}.")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise _fail("federation.groups", f"must have distinct names. Got {names}.")
    return tuple(groups)


def _parse_quantity(value: Mapping[str, Any]) -> tuple[str, Any]:
    if not value:
        return "equal", None
    if set(value) == {"ratios"}:
        ratios = _parse_weights(value["ratios"], "federation.quantity_skew.ratios")
        if min(ratios) <= 0:  # a share of 0 still left the site one image, as size: 0 is refused
            raise _fail("federation.quantity_skew.ratios", f"must be numbers > 0 (each site's share). Got {list(value['ratios'])!r}.")
        return "ratios", ratios
    if set(value) == {"power_law"}:
        exponent = value["power_law"]
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not (math.isfinite(exponent) and exponent >= 0):
            raise _fail("federation.quantity_skew.power_law", f"must be a number >= 0. Got {exponent!r}.")
        return "power_law", float(exponent)
    raise _fail("federation.quantity_skew", f"must be {{ratios: [...]}} or {{power_law: a}}. Got {dict(value)!r}.")


def _profiles(federation: FederationConfig) -> list[SiteProfile]:
    return [_parse_profile(item, f"federation.sites[{i}]") for i, item in enumerate(federation.sites)]


def check_federation_profiles(federation: FederationConfig) -> None:
    """Validate ``federation.sites``, ``groups`` and ``quantity_skew`` (called by the config).

    Raises
    ------
    medfed.config.ConfigError
        Naming the key and what is wrong (unknown corruption, bad severity, a
        ``group_mix`` whose length differs from the number of groups, ...).
    """
    from medfed.config import ConfigError

    try:
        profiles = _profiles(federation)
        groups = _parse_groups(federation.groups)
        _parse_quantity(federation.quantity_skew)
        for index, profile in enumerate(profiles):
            if profile.group_mix is not None and len(profile.group_mix) != len(groups):
                raise _fail(
                    f"federation.sites[{index}].group_mix",
                    f"must give one proportion per patient group ({len(groups)} in federation.groups). "
                    f"Got {len(profile.group_mix)}.",
                )
        if federation.fraction_evaluate == 0 and any(profile.held_out for profile in profiles):
            raise _fail(
                "federation.fraction_evaluate",
                "is 0 (no evaluation), but the federation has held-out sites, which only evaluate: set "
                "fraction_evaluate above 0, or drop held_out from federation.sites.",
            )
    except SiteProfileError as error:
        raise ConfigError(str(error)) from None


def num_held_out(federation: FederationConfig) -> int:
    """Number of held-out sites (profiles with ``held_out: true``)."""
    return sum(1 for item in federation.sites if isinstance(item, Mapping) and item.get("held_out") is True)


def num_nodes(federation: FederationConfig) -> int:
    """Sites to simulate: ``num_sites`` training sites plus the held-out ones."""
    return federation.num_sites + num_held_out(federation)


# ----------------------------------------------------------------------------------
# The plan: one resolved profile per site
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SitePlan:
    """A site as simulated: partition id, name, role and resolved profile."""

    partition_id: int
    name: str
    held_out: bool
    corruptions: Chain
    class_mix: tuple[float, ...] | None
    weight: float
    group_mix: tuple[float, ...] | None


@dataclass(frozen=True)
class FederationPlan:
    """Every site of a federation, resolved for one dataset and seed.

    Attributes
    ----------
    sites : tuple[SitePlan, ...]
        Training sites (partition ids ``0 .. num_sites - 1``), then held-out sites.
    groups : tuple[GroupSpec, ...]
        The federation's patient groups (group id = index).
    partition, dirichlet_alpha
        Label skew of the sites without a class mix.
    plain : bool
        True when no profile, group or quantity skew is set: the split is then the
        plain :func:`~medfed.sites.partition.partition_labels` one.
    """

    sites: tuple[SitePlan, ...]
    groups: tuple[GroupSpec, ...]
    partition: str
    dirichlet_alpha: float
    plain: bool = False
    num_classes: int = 0
    description: dict[str, Any] = field(default_factory=dict, compare=False)


def plan_federation(
    federation: FederationConfig, *, dataset: str, num_classes: int, channels: int, seed: int,
    multi_label: bool = False,
) -> FederationPlan:
    """Resolve the federation's profiles into one :class:`SitePlan` per site.

    Parameters
    ----------
    federation : FederationConfig
        The experiment's ``federation`` section (scenario already merged).
    dataset : str
        MedMNIST flag; chooses the corruptions of ``{random: K}`` chains.
    num_classes, channels : int
        Of the dataset: class mixes must give one weight per class; RGB-only
        corruptions are not drawn for gray images.
    seed : int
        The experiment seed.
    multi_label : bool
        The dataset's images carry several labels (ChestMNIST): they are dealt by size
        only, so label skew (Dirichlet or class mixes) is refused.

    Raises
    ------
    SiteProfileError
        A class mix whose length differs from ``num_classes``, an RGB-only corruption in
        a chain on gray images, or label skew on multi-label data.
    """
    profiles = _profiles(federation)
    if multi_label and (federation.partition == "dirichlet" or any(p.class_mix is not None for p in profiles)):
        where = "federation.partition 'dirichlet'" if federation.partition == "dirichlet" else "a site's class_mix"
        raise SiteProfileError(
            f"{where} skews the sites' labels, but {dataset} is multi-label: its images are dealt to the sites by "
            "size only; use partition 'iid' without class_mix (sites may still differ by size, groups and scanner)."
        )
    groups = _parse_groups(federation.groups)
    quantity, quantity_value = _parse_quantity(federation.quantity_skew)
    training = [p for p in profiles if not p.held_out] or [SiteProfile()]
    held_out = [p for p in profiles if p.held_out]
    num_sites = federation.num_sites
    chosen = [training[i % len(training)] for i in range(num_sites)] + held_out
    if quantity == "ratios":
        weights = [quantity_value[i % len(quantity_value)] for i in range(num_sites)]
    elif quantity == "power_law":
        weights = [(i + 1) ** -quantity_value for i in range(num_sites)]
    else:
        weights = [1.0] * num_sites
    weights += [float(np.mean(weights))] * len(held_out)
    sites = []
    for index, group in enumerate(groups):
        _refuse_saturate_on_gray(group.corruptions, f"federation.groups[{index}]", dataset, channels)
    for pid, profile in enumerate(chosen):
        index = next((i for i, given in enumerate(profiles) if given is profile), None)  # profiles cycle
        where = f"federation.sites[{index}]" if index is not None else "federation.sites"  # None: the default
        if profile.class_mix is not None and len(profile.class_mix) != num_classes:
            raise _fail(f"{where}.class_mix", f"must give one weight per class ({num_classes}). Got {len(profile.class_mix)}.")
        chain = profile.corruptions
        if profile.random_corruptions:
            chain = _random_chain(profile, dataset, channels, site_seed(seed, 5, pid))
        _refuse_saturate_on_gray(chain, where, dataset, channels)
        default_name = f"held-out-{pid - num_sites}" if profile.held_out else f"site-{pid}"
        sites.append(SitePlan(
            partition_id=pid, name=profile.name or default_name,
            held_out=profile.held_out, corruptions=chain, class_mix=profile.class_mix,
            weight=profile.size if profile.size is not None else weights[pid], group_mix=profile.group_mix,
        ))
    # Cycled profiles would repeat a name: keep names unique by suffixing the partition id.
    names = [site.name for site in sites]
    sites = [
        site if names.count(site.name) == 1 else SitePlan(**{**site.__dict__, "name": f"{site.name}-{site.partition_id}"})
        for site in sites
    ]
    names = [site.name for site in sites]
    if len(set(names)) < len(names):  # a suffixed name that another site has: two sites would answer as one
        twice = sorted({name for name in names if names.count(name) > 1})
        raise _fail("federation.sites", f"gives two sites the name {twice[0]!r} (a repeated name is suffixed with "
                                        "the site's number, and another site is named so); rename one.")
    plain = not federation.sites and not federation.groups and not federation.quantity_skew
    return FederationPlan(
        sites=tuple(sites), groups=groups, partition=federation.partition,
        dirichlet_alpha=federation.dirichlet_alpha, plain=plain, num_classes=num_classes,
    )


def _refuse_saturate_on_gray(chain: Chain, where: str, dataset: str, channels: int) -> None:
    if channels != 3 and any(name == "saturate" for name, _ in chain):
        raise _fail(where, f"uses 'saturate', which needs RGB images; {dataset} is gray.")


def _random_chain(profile: SiteProfile, dataset: str, channels: int, seed: int) -> Chain:
    rng = np.random.default_rng(seed)
    names = default_corruptions(dataset, channels=channels)
    count = min(profile.random_corruptions, len(names))
    picked = rng.choice(len(names), size=count, replace=False)
    low, high = profile.severity_range
    return tuple((names[int(i)], int(rng.integers(low, high + 1))) for i in picked)


def plan_for(cfg: ExperimentConfig) -> FederationPlan:
    """:func:`plan_federation` for an experiment (dataset metadata only, no images)."""
    from medfed.data import dataset_info

    from medfed.data.info import MULTI_LABEL, normalize_task

    info = dataset_info(cfg.data.dataset)
    return plan_federation(
        cfg.federation, dataset=cfg.data.dataset, num_classes=info.num_classes, channels=info.in_chans, seed=cfg.seed,
        multi_label=normalize_task(info.task) == MULTI_LABEL,
    )


# ----------------------------------------------------------------------------------
# Splitting and building the site datasets
# ----------------------------------------------------------------------------------
def split_sites(
    plan: FederationPlan, labels: np.ndarray, seed: int, *, shares: np.ndarray | None = None
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Deal sample indices to every site of ``plan``.

    Parameters
    ----------
    plan : FederationPlan
    labels : np.ndarray
        ``[N]`` class indices (``[N, L]`` multi-label: split by size weights only).
    seed : int
        Seed of the draws.
    shares : np.ndarray, optional
        ``[C, S]`` shares of an earlier call (the training split's): deal these
        labels (the test split) alike.

    Returns
    -------
    parts : list[np.ndarray]
        One sorted index array per site, together every index once; every site gets
        at least one sample when there are enough.
    shares : np.ndarray or None
        The ``[C, S]`` shares used (None for a plain IID split or multi-label data).
    """
    num_sites = len(plan.sites)
    labels = np.asarray(labels)
    if plan.plain:
        return partition_labels(
            labels, num_sites, method=plan.partition, alpha=plan.dirichlet_alpha, seed=seed,
            num_classes=plan.num_classes or None, proportions=shares,
        )
    weights = np.array([site.weight for site in plan.sites], dtype=np.float64)
    weights /= weights.sum()
    if labels.ndim == 2 and labels.shape[1] > 1:  # multi-label: sizes only
        order = np.random.default_rng(seed).permutation(labels.shape[0])
        bounds = np.rint(np.cumsum(weights) * labels.shape[0]).astype(np.int64)[:-1]
        parts = [np.sort(p).astype(np.int64) for p in np.split(order, bounds)]
        return _fill_empty_sites(parts, weights * labels.shape[0]), None
    labels = labels.reshape(-1).astype(np.int64)
    if shares is not None:
        return _fill_empty_sites(split_by_proportions(labels, shares, seed), expected_sizes(labels, shares)), shares
    num_classes = max(plan.num_classes, int(labels.max()) + 1 if labels.size else 1)
    prior = np.bincount(labels, minlength=num_classes) / max(labels.size, 1)
    # A Dirichlet draw can leave a site a handful of samples: draw again (next seeds) until
    # every site holds at least _MIN_SHARE of its intended size, else keep the best draw.
    best = None
    for attempt in range(_MAX_REDRAWS if plan.partition == "dirichlet" else 1):
        drawn = _shares(plan, weights, prior, seed + attempt)
        parts = split_by_proportions(labels, drawn, seed)
        fill = min(len(part) / max(w * labels.size, 1e-12) for part, w in zip(parts, weights))
        if best is None or fill > best[0]:
            best = (fill, parts, drawn)
        if fill >= _MIN_SHARE:
            break
    fill, parts, shares = best
    if plan.partition == "dirichlet" and fill < _MIN_SHARE and labels.size:
        smallest = int(np.argmin([len(part) / w for part, w in zip(parts, weights)]))
        warnings.warn(
            f"No Dirichlet(alpha={plan.dirichlet_alpha:g}) label skew in {_MAX_REDRAWS} draws gave every site "
            f"a quarter of its intended size: site {plan.sites[smallest].name} holds {len(parts[smallest])} of "
            f"{weights[smallest] * labels.size:.0f} images in the best draw, kept. Raise "
            "federation.dirichlet_alpha or simulate fewer sites for sites of a useful size.",
            SiteSizeWarning, stacklevel=2,
        )
    return _fill_empty_sites(parts, expected_sizes(labels, shares)), shares


# Under Dirichlet label skew, a site must hold at least this fraction of its intended size.
_MIN_SHARE = 0.25
_MAX_REDRAWS = 50


def _shares(plan: FederationPlan, weights: np.ndarray, prior: np.ndarray, seed: int) -> np.ndarray:
    """``[C, S]``: class ``c``'s share for site ``s``, proportional to ``w_s * m_s[c]``."""
    num_sites, num_classes = len(plan.sites), prior.size
    mixes = np.tile(prior, (num_sites, 1))
    training = [index for index, site in enumerate(plan.sites) if not site.held_out]
    if plan.partition == "dirichlet" and training:
        # A training site's Dirichlet draw over classes (Hsu et al.'s per-class shares),
        # as a class mix; held-out sites keep the dataset's mix.
        draws = dirichlet_proportions(num_classes, len(training), plan.dirichlet_alpha, seed).T
        mixes[training] = draws * prior[None, :] * len(training)
    for index, site in enumerate(plan.sites):
        if site.class_mix is not None:
            mix = np.asarray(site.class_mix, dtype=np.float64)
            mixes[index] = mix / mix.sum()
    raw = weights[:, None] * mixes  # [S, C]
    totals = raw.sum(axis=0, keepdims=True)
    return np.where(totals > 0, raw / np.where(totals > 0, totals, 1), 1.0 / num_sites).T


def deal_sites(
    plan: FederationPlan, train_labels: np.ndarray, test_labels: np.ndarray, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every site's training and test indices, as :func:`build_site` deals them.

    Warns
    -----
    SiteSizeWarning
        Once per split, naming the smallest site, when some site holds under a quarter
        of its intended size: of an equal share of the training split under a plain
        federation's Dirichlet label skew (its shares give sites any size; a profile
        federation's draws warn in :func:`split_sites`); otherwise of what its shares
        give it before rounding, which filling empty sites (every site gets at least one
        image) can take from it when there are nearly as many sites as images.

    Raises
    ------
    SiteProfileError
        When a site would get no image of either split (too few images for the sites).
    """
    try:
        train_parts, shares = split_sites(plan, train_labels, site_seed(seed, 0))
    except PartitionError as err:
        raise SiteProfileError(f"The training split cannot be dealt to the sites: {err}") from None
    try:
        test_parts, _ = split_sites(plan, test_labels, site_seed(seed, 1), shares=shares)
    except PartitionError as err:
        raise SiteProfileError(f"The test split cannot be dealt to the sites: {err}") from None
    for split, parts, labels in (("training", train_parts, train_labels), ("test", test_parts, test_labels)):
        empty = [site.name for site, part in zip(plan.sites, parts) if len(part) == 0]
        if empty:
            raise SiteProfileError(
                f"Site {empty[0]} would get no {split} image: the {split} split holds {len(labels)} image(s) for "
                f"{len(plan.sites)} sites; give the dataset more {split} images, or simulate fewer sites."
            )
    _warn_small_sites(plan, train_parts, train_labels, shares, "training")
    _warn_small_sites(plan, test_parts, test_labels, shares, "test")
    return train_parts, test_parts


def _warn_small_sites(
    plan: FederationPlan, parts: list[np.ndarray], labels: np.ndarray, shares: np.ndarray | None, split: str
) -> None:
    """Warn (SiteSizeWarning) when a site of ``split`` holds under _MIN_SHARE of its intended size."""
    dirichlet = plan.partition == "dirichlet"
    if split == "training" and dirichlet and not plan.plain:
        return  # split_sites has warned, with its redraws
    labels = np.asarray(labels)
    total, num_sites = labels.shape[0], len(plan.sites)
    if split == "training" and dirichlet:
        intended = np.full(num_sites, total / num_sites)
    elif shares is not None:
        intended = expected_sizes(labels.reshape(-1), shares)
    else:
        weights = np.array([site.weight for site in plan.sites], dtype=np.float64)
        intended = weights / weights.sum() * total
    sizes = np.array([len(part) for part in parts], dtype=np.float64)
    short = np.flatnonzero(sizes < _MIN_SHARE * intended)
    if not short.size:
        return
    site = int(short[np.argmin(sizes[short] / intended[short])])
    name, held, meant = plan.sites[site].name, len(parts[site]), intended[site]
    if split == "training" and dirichlet:
        message = (
            f"Dirichlet(alpha={plan.dirichlet_alpha:g}) label skew leaves {short.size} of {num_sites} sites under "
            f"a quarter of an equal share of the {total} training images: site {name} trains on {held} of "
            f"{meant:.0f}. Raise federation.dirichlet_alpha or simulate fewer sites for sites of a useful size."
        )
    else:
        message = (
            f"Site {name} gets {held} of the {meant:.0f} {split} images its share intends ({short.size} of "
            f"{num_sites} sites get under a quarter of theirs): the {split} split holds {total} images for "
            f"{num_sites} sites, and every site gets at least one. Simulate fewer sites for {split} splits of "
            "a useful size."
        )
    warnings.warn(message, SiteSizeWarning, stacklevel=3)


def build_site(
    plan: FederationPlan, partition_id: int, train: ImageDataset, test: ImageDataset, seed: int
) -> tuple[ImageDataset, ImageDataset]:
    """The training and test splits of one site, its profile applied.

    The dataset's splits are dealt to the sites (:func:`split_sites`, seeds derived
    from ``seed``), the site's share is taken, its samples draw their patient groups,
    each group's corruptions and then the site's chain are applied. Pure function of
    its arguments: every process that calls it gets the same arrays.
    """
    if not 0 <= partition_id < len(plan.sites):
        raise SiteProfileError(
            f"Partition id {partition_id} is not a site of this federation (0 .. {len(plan.sites) - 1}); "
            "simulate num_sites plus held-out sites."
        )
    train_parts, test_parts = deal_sites(plan, train.labels, test.labels, seed)
    site = plan.sites[partition_id]
    return (
        apply_profile(plan, site, train.subset(train_parts[partition_id]), seed, split=0),
        apply_profile(plan, site, test.subset(test_parts[partition_id]), seed, split=1),
    )


def apply_profile(plan: FederationPlan, site: SitePlan, data: ImageDataset, seed: int, *, split: int) -> ImageDataset:
    """Give ``data`` the site's patient groups and appearance (groups' then the site's corruptions)."""
    from medfed.data import ImageDataset

    if plan.plain or (not plan.groups and not site.corruptions):
        return data
    images, groups = data.images, data.groups
    if plan.groups:
        mix = np.asarray(site.group_mix if site.group_mix is not None else [1.0] * len(plan.groups), dtype=np.float64)
        rng = np.random.default_rng(site_seed(seed, 2, site.partition_id, split))
        groups = rng.choice(len(plan.groups), size=len(data), p=mix / mix.sum()).astype(np.int64)
        images = images.copy()
        for group_id, group in enumerate(plan.groups):
            members = np.flatnonzero(groups == group_id)
            for step, (name, severity) in enumerate(group.corruptions):
                if members.size:
                    images[members] = corrupt(
                        images[members], name, severity, site_seed(seed, 3, site.partition_id, split, group_id, step)
                    )
    for step, (name, severity) in enumerate(site.corruptions):
        images = corrupt(images, name, severity, site_seed(seed, 4, site.partition_id, split, step))
    return ImageDataset(images, data.labels, data.info, groups=groups, transform=data.transform)


def describe_chain(chain: Sequence[tuple[str, int]]) -> str:
    """``"gaussian_noise:2 > contrast_down:3"`` (``"none"`` when empty)."""
    return " > ".join(f"{name}:{severity}" for name, severity in chain) or "none"
