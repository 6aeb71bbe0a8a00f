"""Which engine ``simulation.engine: auto`` picks (resolve_engine), on pretend machines."""

from __future__ import annotations

import pytest

from medfed.config import load_config
from medfed.simulation import run


@pytest.fixture
def machine(monkeypatch):
    """``machine(cpus, gpus)``: make resolve_engine see that many CPUs and GPUs."""

    def set_machine(cpus: int, gpus: int = 0) -> None:
        monkeypatch.setattr(run, "_available_cpus", lambda: cpus)
        monkeypatch.setattr(run, "_visible_gpus", lambda: gpus)

    return set_machine


@pytest.mark.parametrize(
    ("cpus", "gpus", "overrides", "expected"),
    [
        (2, 0, [], "ray"),  # the default federation on 2 cores: 2 sites at once
        (1, 0, [], "inprocess"),  # one core: one site at a time anyway
        (8, 0, ["simulation.cpus_per_site=8"], "inprocess"),  # each site takes the machine
        (8, 0, ["federation.num_sites=1"], "inprocess"),
        (2, 1, ["simulation.gpus_per_site=1"], "inprocess"),  # one GPU: the sites take it in turn
        (16, 1, ["simulation.gpus_per_site=0.25"], "inprocess"),
        (16, 4, ["simulation.gpus_per_site=1"], "ray"),  # several GPUs in parallel
        (1, 0, ["simulation.ray_address=auto"], "ray"),  # joining a cluster
        (16, 0, ["simulation.engine=inprocess"], "inprocess"),  # named engines are kept
        (1, 0, ["simulation.engine=ray"], "ray"),
    ],
)
def test_auto_engine_rule(machine, cpus, gpus, overrides, expected):
    # Prepare
    machine(cpus, gpus)
    cfg = load_config(overrides=overrides)
    # Execute / Assert
    assert run.resolve_engine(cfg) == expected
