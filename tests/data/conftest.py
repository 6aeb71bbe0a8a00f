"""Fixtures of the data tests: tiny MedMNIST-layout files and a network guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import medfed.data.medmnist_files as medmnist_files

#: The repository's shared real data (read-only), ../shared/data from the repository root.
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any test that would open a URL: data tests never touch the network."""

    def refuse(url, timeout_s):
        raise AssertionError(f"A data test tried to open {url}; tests must not touch the network.")

    monkeypatch.setattr(medmnist_files, "_open_url", refuse)


def _make_arrays(
    counts=(6, 2, 3), size: int = 28, channels: int = 1, num_classes: int = 2, num_labels: int = 0, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random arrays in the MedMNIST layout; ``num_labels > 0`` makes multi-label [N, L] labels."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if num_labels:
            arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, num_labels), dtype=np.uint8)
        else:
            arrays[f"{split}_labels"] = rng.integers(0, num_classes, size=(n, 1), dtype=np.uint8)
    return arrays


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def make_arrays():
    """``make_arrays(counts, size, channels, num_classes, num_labels, seed)`` -> MedMNIST-layout arrays."""
    return _make_arrays


@pytest.fixture
def write_npz():
    """``write_npz(path, arrays)`` -> path of a compressed .npz holding ``arrays``."""
    return _write_npz


@pytest.fixture
def shared_data_dir() -> Path:
    """The shared real data folder; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"Shared real data not found at {SHARED_DATA} (../shared/data from the repository root).")
    return SHARED_DATA
