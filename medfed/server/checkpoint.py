"""Server checkpoints and plain model files, stored as safetensors and written atomically.

A checkpoint (``RUN_DIR/checkpoint.safetensors``) holds everything the server needs to
continue a run after the last complete round:

* the global model arrays, stored under ``model/<state_dict key>``;
* the strategy's state between rounds (e.g. FedAdam moments), under ``strategy/<key>``;
* in the safetensors metadata (a str -> str map): the format name and version, the round
  number and a JSON document with the rest (RNG state, metrics history, config, and the
  run key under which the sites keep their local state).

Both kinds of file are written to a temporary file in the target's directory, flushed and
fsynced, then moved onto the target with :func:`os.replace`, so a crash at any moment leaves
either the old complete file or the new complete file, never a truncated one. Their
metadata also holds ``medfed-arrays-sha256``, a digest of every array (name, dtype, shape, bytes):
safetensors checks a file's layout, not its contents, so a flipped bit in the weights
(a failing disk, a bad copy) would otherwise load silently. Reading all arrays checks it;
files without it (written before it existed, or by other tools) are read unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from medfed._io import json_text, write_bytes_atomic
from medfed.errors import MedfedError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "checkpoint_model_shapes",
    "checkpoint_round",
    "checkpoint_state",
    "load_arrays",
    "load_checkpoint",
    "save_arrays",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "medfed.checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

_MODEL_PREFIX = "model/"
_DIGEST_KEY = "medfed-arrays-sha256"
_STRATEGY_PREFIX = "strategy/"


class CheckpointError(MedfedError):
    """A checkpoint or model file is missing, unreadable or not in the expected format."""


@dataclass(frozen=True)
class Checkpoint:
    """The server's state after a complete round.

    Attributes
    ----------
    server_round : int
        The last round that completed (>= 0); a resumed run starts at ``server_round + 1``.
    arrays : dict[str, np.ndarray]
        Global model arrays keyed by the model's ``state_dict`` keys.
    strategy_state : dict[str, np.ndarray]
        The strategy's arrays between rounds (empty for stateless strategies).
    state : dict[str, Any]
        JSON-compatible extra state (RNG state, metrics history, config, run key).
    """

    server_round: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | Path,
    *,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    strategy_state: Mapping[str, np.ndarray],
    state: Mapping[str, Any],
) -> None:
    """Write a checkpoint atomically to ``path`` (one safetensors file).

    Parameters
    ----------
    path : str or Path
        Target file, usually ``RUN_DIR/checkpoint.safetensors``; its directory must exist.
    server_round : int
        The last completed round, >= 0.
    arrays : Mapping[str, np.ndarray]
        Global model arrays (any shape, including 0-d; any numeric dtype).
    strategy_state : Mapping[str, np.ndarray]
        Strategy arrays kept between rounds.
    state : Mapping[str, Any]
        JSON-serialisable extra state, stored in the file's metadata as standard JSON
        (:func:`medfed._io.json_text`: NaN and inf are read back as None).

    Raises
    ------
    CheckpointError
        If ``server_round`` is not an int >= 0, ``state`` is not JSON-serialisable or an
        array cannot be stored.
    """
    path = Path(path)
    if isinstance(server_round, bool) or not isinstance(server_round, (int, np.integer)) or server_round < 0:
        raise CheckpointError(
            f"The 'server_round' of checkpoint {path} must be an int >= 0. Got {server_round!r} instead."
        )
    try:
        state_json = json_text(dict(state))  # standard JSON: a NaN in the metrics history is null
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"The 'state' of checkpoint {path} must be JSON-serialisable "
            f"(convert tensors and sets to lists first): {error}"
        ) from error
    tensors = {_MODEL_PREFIX + key: value for key, value in arrays.items()}
    tensors.update({_STRATEGY_PREFIX + key: value for key, value in strategy_state.items()})
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_FORMAT_VERSION),
        "server_round": str(int(server_round)),
        "state": state_json,
    }
    _write_atomically(path, tensors, metadata)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or Path
        The checkpoint file.

    Returns
    -------
    Checkpoint
        Arrays come back bit-exactly, with their dtypes and shapes.

    Raises
    ------
    CheckpointError
        If the file is missing, truncated or corrupt, is not a medfed checkpoint, or has
        another format version.
    """
    path = Path(path)
    tensors, metadata = _read(path, what="checkpoint")
    server_round, state = _checked_metadata(path, metadata)
    arrays = {k[len(_MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)}
    strategy_state = {k[len(_STRATEGY_PREFIX):]: v for k, v in tensors.items() if k.startswith(_STRATEGY_PREFIX)}
    return Checkpoint(server_round=server_round, arrays=arrays, strategy_state=strategy_state, state=state)


def checkpoint_round(path: str | Path) -> int:
    """The last completed round of the checkpoint at ``path``, read without its arrays.

    Raises
    ------
    CheckpointError
        As :func:`load_checkpoint`.
    """
    return checkpoint_state(path)[0]


def checkpoint_state(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(last completed round, JSON state) of the checkpoint at ``path``, read without its arrays.

    Raises
    ------
    CheckpointError
        As :func:`load_checkpoint`.
    """
    path = Path(path)
    return _checked_metadata(path, _read(path, what="checkpoint", tensors=False)[1])


def checkpoint_model_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The global model's array names and shapes in the checkpoint at ``path``, read from its
    header only (no array is loaded).

    Raises
    ------
    CheckpointError
        As :func:`load_checkpoint`.
    """
    path = Path(path)
    checkpoint_state(path)  # a medfed checkpoint of this format version
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return {key[len(_MODEL_PREFIX):]: tuple(handle.get_slice(key).get_shape())
                    for key in handle.keys() if key.startswith(_MODEL_PREFIX)}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"The checkpoint {path} is truncated or corrupt ({error}); restore it from a backup, or start the run afresh in a new folder."
        ) from error


def _checked_metadata(path: Path, metadata: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """(server_round, state) of a checkpoint's metadata, or a one-line CheckpointError."""
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a medfed checkpoint (its metadata 'format' is "
            f"{metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); pass the run's checkpoint.safetensors."
        )
    version = metadata.get("format_version")
    if version != str(CHECKPOINT_FORMAT_VERSION):
        raise CheckpointError(
            f"Checkpoint {path} has format version {version!r}, but this medfed reads version "
            f"{CHECKPOINT_FORMAT_VERSION}; resume it with the medfed version that wrote it or start fresh."
        )
    try:
        return int(metadata["server_round"]), json.loads(metadata["state"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(
            f"Checkpoint {path} has damaged metadata ({error!r}); restore it from a backup, or start the run afresh in a new folder."
        ) from error


def save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write a plain model file (e.g. ``RUN_DIR/model.safetensors``) atomically.

    Parameters
    ----------
    path : str or Path
        Target file; its directory must exist.
    arrays : Mapping[str, np.ndarray]
        Arrays keyed by the model's ``state_dict`` keys, stored under those keys unchanged
        so that other safetensors tools can read the file.
    """
    _write_atomically(Path(path), dict(arrays), metadata={"format": "medfed.model"})


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Read all arrays of a safetensors file written by :func:`save_arrays` (or any tool).

    Raises
    ------
    CheckpointError
        If the file is missing, truncated or corrupt.
    """
    tensors, _ = _read(Path(path), what="model file")
    return tensors


def _as_storable(key: str, value: np.ndarray, path: Path) -> np.ndarray:
    """Return ``value`` as a C-contiguous, native-byte-order ndarray (0-d arrays stay 0-d)."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise CheckpointError(
            f"Array {key!r} for {path} has dtype {array.dtype}, but only bool, integer and float arrays "
            "can be stored; convert it first."
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    return array


def _arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of the arrays' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.asarray(arrays[key])
        little = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)  # a copy only when needed
        digest.update(f"{key}\0{little.dtype.str}\0{array.shape}\0".encode())
        digest.update(little.data if little.ndim else little.tobytes())
    return digest.hexdigest()


def _write_atomically(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write ``tensors`` to a temporary sibling of ``path``, fsync it and move it onto ``path``."""
    storable = {key: _as_storable(key, value, path) for key, value in tensors.items()}
    metadata = {**metadata, _DIGEST_KEY: _arrays_digest(storable)}
    write_bytes_atomic(path, save(storable, metadata=metadata))
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX only; Windows cannot open a directory)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read(path: Path, *, what: str, tensors: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Return (arrays, metadata) of a safetensors file, with one-line errors (no arrays
    without ``tensors``); arrays are checked against the file's digest when it has one."""
    if not path.is_file():
        raise CheckpointError(
            f"No {what} at {path}: check the path, or start a fresh run instead of resuming."
        )
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            arrays = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"The {what} {path} is truncated or corrupt ({error}); restore it from a backup, or start the run afresh in a new folder."
        ) from error
    if tensors and _DIGEST_KEY in metadata and _arrays_digest(arrays) != metadata[_DIGEST_KEY]:
        raise CheckpointError(
            f"The {what} {path} is damaged: its arrays no longer match the checksum written with them (a disk "
            "error or a changed file); restore it from a backup, or start the run afresh in a new folder."
        )
    return arrays, metadata
