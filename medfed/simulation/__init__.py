"""Simulated federations: running Flower's simulation engine.

``from medfed.simulation import simulate`` loads the launcher (Flower, Ray) on first use;
importing the package itself stays light. How a dataset is split among simulated sites
lives in :mod:`medfed.sites`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["simulate"]


def __getattr__(name: str) -> Any:
    if name == "simulate":
        from .run import simulate

        return simulate
    raise AttributeError(f"module 'medfed.simulation' has no attribute {name!r}")
