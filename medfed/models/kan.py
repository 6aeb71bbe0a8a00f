"""Kolmogorov-Arnold feed-forward layers in the FasterKAN style.

MedViTV2 (Manzari et al., 2025) replaces the MLP of its global blocks by a
Kolmogorov-Arnold network. FasterKAN (Delis, 2024) makes KANs cheap by using,
instead of B-splines, reflectional switch activation functions (RSWAF)::

    phi_i(x) = 1 - tanh((x - g_i) / h) ** 2

on a fixed grid ``g_1 < ... < g_G``; a layer maps ``[..., in]`` to
``[..., out]`` as ``Linear(flatten(phi(LayerNorm(x))))``.

The grid (8 points on [-2, 2]) and the bump width ``h = 0.33`` are those of the
FasterKAN copy that the public MedViTV2 code vendors (its ``denominator``; upstream
FasterKAN's default differs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["RSWAFBasis", "FasterKANLayer", "KANFeedForward"]


class RSWAFBasis(nn.Module):
    """Radial-like basis ``1 - tanh((x - g) / h)^2`` on a fixed grid.

    Args:
        grid_min: Smallest grid point.
        grid_max: Largest grid point.
        num_grids: Number of grid points ``G``.
        width: Bump width ``h`` (the public MedViTV2 code's ``denominator``).

    Shapes:
        input ``[..., D]`` -> output ``[..., D, G]``.
    """

    def __init__(
        self,
        grid_min: float = -2.0,
        grid_max: float = 2.0,
        num_grids: int = 8,
        width: float = 0.33,
    ) -> None:
        super().__init__()
        if num_grids < 2:
            raise ValueError(f"RSWAFBasis needs num_grids >= 2. Got {num_grids}.")
        grid = torch.linspace(grid_min, grid_max, num_grids)
        self.register_buffer("grid", grid, persistent=False)
        if width <= 0:
            raise ValueError(f"RSWAFBasis needs width > 0. Got {width}.")
        self.inv_width = 1.0 / width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh((x.unsqueeze(-1) - self.grid) * self.inv_width)
        return 1.0 - t * t


class FasterKANLayer(nn.Module):
    """One KAN layer: LayerNorm, RSWAF basis expansion, linear map.

    Args:
        in_features: Input width ``D_in``.
        out_features: Output width ``D_out``.
        num_grids: Grid points per input feature.
        grid_min: Smallest grid point.
        grid_max: Largest grid point.

    Shapes:
        ``[..., D_in]`` -> ``[..., D_out]``; the weight has ``D_in * G * D_out``
        entries, which is why KAN layers dominate MedViTV2's parameter count.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_grids: int = 8,
        grid_min: float = -2.0,
        grid_max: float = 2.0,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.basis = RSWAFBasis(grid_min, grid_max, num_grids)
        self.linear = nn.Linear(in_features * num_grids, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi = self.basis(self.norm(x))
        return self.linear(phi.flatten(-2))


class KANFeedForward(nn.Module):
    """A stack of FasterKAN layers acting on channels of a feature map.

    Args:
        widths: Layer widths, e.g. ``[C, 2C, C]`` for MedViTV2's global blocks.
        num_grids: Grid points per input feature.

    Shapes:
        ``[B, C, H, W]`` -> ``[B, widths[-1], H, W]``. Channels are moved last
        with a permute (never a reshape, which would mix channels and space).
    """

    def __init__(self, widths: Sequence[int], num_grids: int = 8) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"KANFeedForward needs at least two widths. Got {list(widths)}.")
        self.layers = nn.Sequential(
            *(FasterKANLayer(a, b, num_grids) for a, b in zip(widths[:-1], widths[1:]))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
