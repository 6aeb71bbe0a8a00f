"""Tiny generated MedMNIST-style data and configs shared by the client, simulation and CLI tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medfed.config import config_from_dict

# No telemetry calls from Flower (the test machines have no internet).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def write_tiny_breastmnist(root: Path, sizes: tuple[int, int, int] = (24, 6, 12), seed: int = 0) -> Path:
    """Write ``root/breastmnist.npz``: 28 px grayscale, 2 classes, brightness tells the class."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        labels = np.arange(n) % 2  # balanced, so every IID site sees both classes
        rng.shuffle(labels)
        images = rng.integers(0, 80, size=(n, 28, 28)) + 100 * labels[:, None, None]
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(n, 1).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "breastmnist.npz", **arrays)
    return root


def _tiny_config(root: Path, output_dir: Path, **overrides):
    """A 3-site, 2-round FedAvg federation of medvit_v2_nano on the tiny data."""
    data = {
        "name": "tiny", "seed": 0, "output_dir": str(output_dir), "rounds": 2,
        "data": {"dataset": "breastmnist", "root": str(root), "img_size": 28},
        "model": {"name": "medvit_v2_nano"},
        "train": {"local_epochs": 1, "batch_size": 8, "lr": 1e-3},
        "federation": {"num_sites": 3, "partition": "iid"},
        "simulation": {"cpus_per_site": 1.0},
    }
    data.update(overrides)
    return config_from_dict(data)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return write_tiny_breastmnist(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: ``tiny_config(root, output_dir, **top_level_overrides) -> ExperimentConfig``."""
    return _tiny_config


def _metric_records(run_dir: Path) -> list[dict]:
    """The site and round records of a run's metrics.jsonl, without their timings (which vary)."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] in ("site", "round"):
            records.append({k: v for k, v in record.items() if k not in ("time_s", "wall_time_s", "time")})
    return records


@pytest.fixture(scope="session")
def metric_records():
    """``metric_records(run_dir) -> list[dict]``: comparable records of a run."""
    return _metric_records
