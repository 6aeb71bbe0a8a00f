"""What a site keeps between rounds (its strategy's local state), per site and resumable.

A strategy's client hooks name what stays at the site (FedBN: its BatchNorm). The
ClientApp keeps it

* in Flower's ``context.state`` (one per site, so simulated sites served by the same
  worker never see each other's), as an ArrayRecord plus the round it was written in;
* and, where a state folder is configured, on disk, so that a restarted process (a
  resumed simulation, a rebooted SuperNode) continues with it: one safetensors file per
  completed round, ``{state_dir}/{site}/{run_key}/round-000007.safetensors``, written
  atomically. The folder comes from the node config key ``state-dir`` (deployment: a
  folder at the site, which serves run after run) or the run config key
  ``site-state-dir`` (simulation: ``{run_dir}/site-state``, set by the launchers).
  ``run_key`` is the key the server sends with every instruction (``"run-key"``): made
  when a run starts and kept by its resumes, so one run never reads, nor prunes, the
  state of another. Instructions without one (a run begun before medfed sent keys) use
  ``{state_dir}/{site}/`` as before.

A round ``t`` loads the newest state written before it (training: ``r < t``;
evaluation, which follows training in the same round: ``r <= t``). A resumed run
restarts at the round after its checkpoint, and a site that trains a round again
rewrites its file, so training never reads what a killed process wrote for a round the
server never completed. Evaluation may: a site that does not train round ``t`` again
(not sampled, or failed) is evaluated with the killed run's round-``t`` file, which,
with the run's fixed seeds, holds what training round ``t`` again would write. The
newest three files per site are kept.

Each file (and the in-memory copy) carries the study's fingerprint
(:func:`medfed.config.study_fingerprint`: every setting but those a resume may change),
and state is read only by the study that wrote it. The run key comes from the server:
one that reused another study's key (say a Local-only study's, whose site models never
left the sites) would otherwise make the site load that private state into the model it
sends back. Such an instruction is refused (:class:`ForeignSiteState`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from medfed._io import private_folder, write_bytes_atomic
from medfed.errors import MedfedError

__all__ = [
    "NODE_STATE_DIR_KEY", "RUN_KEY", "SITE_STATE_DIR_KEY", "DamagedSiteState", "ForeignSiteState", "load_site_state",
    "save_site_state", "site_state_dir",
]

NODE_STATE_DIR_KEY = "state-dir"
SITE_STATE_DIR_KEY = "site-state-dir"
#: The instruction config key of the run's key (see the module docstring).
RUN_KEY = "run-key"
_ARRAYS = "medfed-site-state"
_ROUND = "medfed-site-state-round"
#: The safetensors metadata key (and the in-memory ConfigRecord key) of the study's fingerprint.
_STUDY = "medfed-study"
_KEEP = 3
_FILE = re.compile(r"round-(\d{6})\.safetensors")


class ForeignSiteState(MedfedError):
    """The state kept under this run key was written by another study, or (``legacy``) by
    a medfed that did not record its study; it is not read."""

    def __init__(self, message: str, *, legacy: bool = False) -> None:
        super().__init__(message)
        self.legacy = legacy


class DamagedSiteState(MedfedError):
    """The newest kept state file cannot be read (truncated or corrupted since it was
    written); the message names the file and what to do."""


def site_state_dir(context: Context, site_name: str, run_key: str = "") -> Path | None:
    """This site's state folder for the run ``run_key``, or None when neither config names one."""
    root = context.node_config.get(NODE_STATE_DIR_KEY) or context.run_config.get(SITE_STATE_DIR_KEY)
    if not root:
        return None
    folder = Path(str(root)).expanduser() / _safe(site_name, "site")
    return folder / _safe(run_key, "run") if run_key else folder


def _safe(name: str, fallback: str) -> str:
    """``name`` as one folder name: no separators, no leading dots."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or fallback


def load_site_state(
    context: Context, site_name: str, *, latest_round: int, run_key: str = "", study: str = ""
) -> dict[str, torch.Tensor]:
    """The newest state written in a round ``<= latest_round`` (``{}`` if none).

    Parameters
    ----------
    context : Context
        The site's Flower context.
    site_name : str
        The site's name (its folder under the state folder).
    latest_round : int
        Newest round whose state may be used: ``t - 1`` to train round ``t``, ``t`` to
        evaluate it.
    run_key : str
        The run's key, as the server sent it (``""``: none, the folder of old runs).
    study : str
        The study's fingerprint (:func:`medfed.config.study_fingerprint`); state written
        under another is not read.

    Raises
    ------
    ForeignSiteState
        The newest state was written by another study (the folder is named, for the
        site's log; the server must be told less).
    DamagedSiteState
        The newest state file cannot be read (named, with what to do, for the site's log).
    """
    state = context.state
    if _ARRAYS in state.array_records and _ROUND in state.config_records:
        kept = state.config_records[_ROUND]
        if int(kept["round"]) <= latest_round:
            if str(kept.get("study", "")) != study:
                raise ForeignSiteState("this site's state in memory was written by another study")
            return state.array_records[_ARRAYS].to_torch_state_dict()
    folder = site_state_dir(context, site_name, run_key)
    if folder is None or not folder.is_dir():
        return {}
    rounds = sorted(r for r in _rounds_on_disk(folder) if r <= latest_round)
    if not rounds:
        return {}
    path = folder / f"round-{rounds[-1]:06d}.safetensors"
    try:
        with safe_open(str(path), framework="pt") as handle:
            written_by = (handle.metadata() or {}).get(_STUDY, "")
        if written_by == study:
            return load_file(str(path))
    except (SafetensorError, OSError) as error:  # written atomically: damaged since (a disk, a hand)
        older = f"round-{rounds[-2]:06d}" if len(rounds) > 1 else "none"
        raise DamagedSiteState(
            f"{path} cannot be read ({type(error).__name__}: {error}); delete it to go on from the site's state "
            f"before it (kept: {older}), or restore it from a backup"
        ) from None
    if not written_by:
        raise ForeignSiteState(f"{path} was written by an older medfed, which did not record its study",
                               legacy=True)
    raise ForeignSiteState(f"{path} was written by another study than this one")


def save_site_state(
    context: Context, site_name: str, server_round: int, state: Mapping[str, torch.Tensor], *, run_key: str = "",
    study: str = "",
) -> None:
    """Keep ``state`` as written in ``server_round`` of the run ``run_key`` by the study
    ``study`` (its fingerprint); nothing happens when it is empty."""
    if not state:
        return
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    context.state[_ARRAYS] = ArrayRecord(tensors)
    context.state[_ROUND] = ConfigRecord({"round": int(server_round), "study": study})
    folder = site_state_dir(context, site_name, run_key)
    if folder is None:
        return
    # Private to the site's account: a Local-only site's file is its whole model, trained
    # on its patients (the folder 0700, files 0600, whatever the umask).
    private_folder(folder)
    path = folder / f"round-{server_round:06d}.safetensors"
    write_bytes_atomic(path, save(tensors, metadata={_STUDY: study}), mode=0o600)
    for old in sorted(_rounds_on_disk(folder))[:-_KEEP]:
        (folder / f"round-{old:06d}.safetensors").unlink(missing_ok=True)


def _rounds_on_disk(folder: Path) -> list[int]:
    return [int(m.group(1)) for p in folder.iterdir() if (m := _FILE.fullmatch(p.name))]
