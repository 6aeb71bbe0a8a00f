"""Load a model's weights from a checkpoint file written by medfed (``model.init_from``)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from medfed.errors import MedfedError

__all__ = ["PretrainedError", "checkpoint_digest", "load_pretrained", "resolve_checkpoint", "state_dict_misfit"]

#: The model file of a run folder (``medfed.server.run_files.MODEL_FILE``; the models
#: package does not import the federation's, see ARCHITECTURE.md).
MODEL_FILE = "model.safetensors"

class PretrainedError(MedfedError):
    """``model.init_from`` names no usable checkpoint for the model being built."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The ``model.safetensors`` that ``path`` names: the file, or the one in a run folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise PretrainedError(
            f"model.init_from: no checkpoint at {path}; give a 'medfed train' or 'medfed simulate' output "
            f"(its {MODEL_FILE} or its run folder)."
        )
    return path


def checkpoint_digest(path: str | Path) -> str:
    """The SHA-256 (hex) of the ``model.safetensors`` that ``path`` names."""
    digest = hashlib.sha256()
    with open(resolve_checkpoint(path), "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_pretrained(model: nn.Module, path: str | Path, sha256: str | None = None) -> nn.Module:
    """Load every entry of ``model``'s state dict from the checkpoint at ``path``.

    Parameters
    ----------
    model : nn.Module
        A freshly built model of the checkpoint's variant and sizes.
    path : str or Path
        A ``model.safetensors`` or a folder holding one.
    sha256 : str, optional
        The checkpoint's expected :func:`checkpoint_digest`: a site loads only the file
        the server started from, never another file that happens to lie at that path.

    Returns
    -------
    nn.Module
        ``model``, loaded in place.

    Raises
    ------
    PretrainedError
        Missing or unreadable file, or arrays that do not fit the model (another
        variant, class count or image size).
    """
    file = resolve_checkpoint(path)
    if sha256 is not None and checkpoint_digest(file) != sha256:
        raise PretrainedError(f"model.init_from: {file} is not the checkpoint the server started from (another SHA-256).")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise PretrainedError(f"model.init_from: cannot read {file}: {error}.") from error
    own = model.state_dict()
    misfit = state_dict_misfit(own, state)
    if misfit:
        raise PretrainedError(
            f"model.init_from: the weights in {file} do not fit this model: {misfit} "
            "(were they written for another model variant, dataset or image size?)."
        )
    with torch.no_grad():
        model.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)
    return model


def state_dict_misfit(own: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> str | None:
    """Why ``state`` cannot be loaded into a model whose state dict is ``own``, or None.

    Names the first key that ``state`` lacks, holds in excess, or holds in another shape.
    A ``(1,)`` entry fits a 0-d one: federated runs store BatchNorm's counters so, and
    ``load_state_dict`` takes them.
    """
    missing = [k for k in own if k not in state]
    if missing:
        return f"they lack {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        return f"they hold {unexpected[0]!r}, which the model has not"
    for key, value in own.items():
        shape = tuple(state[key].shape)
        if shape != tuple(value.shape) and not (value.dim() == 0 and shape == (1,)):
            return f"their {key!r} has shape {shape}, the model's {tuple(value.shape)}"
    return None
