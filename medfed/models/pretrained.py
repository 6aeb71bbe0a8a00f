"""Load a model's weights from a checkpoint file written by medfed (``model.init_from``)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from medfed.errors import MedfedError

__all__ = ["PretrainedError", "load_pretrained", "resolve_checkpoint"]

_MODEL_FILE = "model.safetensors"


class PretrainedError(MedfedError):
    """``model.init_from`` names no usable checkpoint for the model being built."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The ``model.safetensors`` that ``path`` names: the file, or the one in a run folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / _MODEL_FILE
    if not path.is_file():
        raise PretrainedError(
            f"model.init_from: no checkpoint at {path}; give a 'medfed train' or 'medfed simulate' output "
            f"(its {_MODEL_FILE} or its run folder)."
        )
    return path


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load every entry of ``model``'s state dict from the checkpoint at ``path``.

    Parameters
    ----------
    model : nn.Module
        A freshly built model of the checkpoint's variant and sizes.
    path : str or Path
        A ``model.safetensors`` or a folder holding one.

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
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise PretrainedError(f"model.init_from: cannot read {file}: {error}.") from error
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    for key in own:
        # Federated runs store 0-d entries (BatchNorm counters) with shape (1,).
        if key in state and own[key].dim() == 0 and tuple(state[key].shape) == (1,):
            state[key] = state[key].reshape(())
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        what = f"lacks {missing[:3]}" if missing else f"has {wrong[0]!r} of shape {tuple(state[wrong[0]].shape)}"
        raise PretrainedError(
            f"model.init_from: {file} does not fit this model: it {what} "
            "(was it written for another model variant, dataset or image size?)."
        )
    with torch.no_grad():
        model.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)
    return model
