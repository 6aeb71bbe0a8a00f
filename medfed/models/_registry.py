"""A small model registry: ``create_model("medvit_v2_nano", num_classes=2)``."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

from medfed.errors import MedfedError

__all__ = ["UnknownModelError", "register_model", "create_model", "list_models", "registered_name"]



class UnknownModelError(MedfedError):
    """No model is registered under the requested name, or its sizes are invalid."""


_MODELS: dict[str, Callable[..., nn.Module]] = {}
#: The MedViTV2 variants' names start so; the command line takes the size alone.
_MEDVIT_PREFIX = "medvit_v2_"


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name (warns when replacing one)."""
    if fn.__name__ in _MODELS:
        warnings.warn(f"Model '{fn.__name__}' was already registered; replacing it.", stacklevel=2)
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)


def registered_name(name: str) -> str:
    """The registered name of a MedViTV2 size, as the command line takes it ("nano" ->
    "medvit_v2_nano"); a name that already starts with ``medvit_v2_`` is returned as is."""
    return name if name.startswith(_MEDVIT_PREFIX) else f"{_MEDVIT_PREFIX}{name}"


def create_model(name: str, num_classes: int, in_chans: int = 3, img_size: int = 224, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: A name from :func:`list_models`, e.g. ``"medvit_v2_nano"``.
        num_classes: Classifier outputs.
        in_chans: Input channels.
        img_size: Input side (pixels) the model is planned for.
        **kwargs: Further constructor arguments of the model.
    """
    if name not in _MODELS:
        raise UnknownModelError(f"Unknown model '{name}'. Expected one of: {', '.join(list_models())}.")
    if num_classes < 1 or in_chans < 1 or img_size < 1:
        raise UnknownModelError(
            f"Model '{name}' needs positive num_classes, in_chans and img_size. "
            f"Got {num_classes}, {in_chans}, {img_size}."
        )
    return _MODELS[name](num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
