"""Simulated federations: splitting a dataset among sites and running Flower's simulation engine.

``from medfed.simulation import simulate`` loads the launcher (Flower, Ray) on first use;
importing the package itself stays light, because the ClientApp imports the pure-NumPy
:mod:`medfed.simulation.partition` to find its share of a simulated dataset.
"""

from __future__ import annotations

from typing import Any

__all__ = ["simulate"]


def __getattr__(name: str) -> Any:
    if name == "simulate":
        from .run import simulate

        return simulate
    raise AttributeError(f"module 'medfed.simulation' has no attribute {name!r}")
