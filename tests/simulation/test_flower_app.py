"""The Flower app description: the generated one (simulate) and pyproject.toml's (flwr run)."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp
from flwr.common.config import flatten_dict, validate_fields_in_config
from flwr.serverapp import ServerApp

from medfed.config import config_from_dict, from_run_config, load_config, to_run_config
from medfed.server.server_app import read_run_config
from medfed.simulation.run import app_pyproject

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_generated_app_pyproject_gives_back_the_experiment():
    # Prepare: values that need escaping or typing care.
    cfg = config_from_dict({
        "seed": 3, "train": {"lr": 1e-5}, "simulation": {"ray_address": "10.0.0.2:6379", "engine": "ray"},
        "strategy": {"name": "fedprox", "params": {"proximal_mu": 0.1, "note": 'say "hi"'}},
    })
    # Execute
    toml = tomllib.loads(app_pyproject(to_run_config(cfg)))
    # Assert
    assert validate_fields_in_config(toml)[0]
    flat = flatten_dict(toml["tool"]["flwr"]["app"]["config"])
    assert flat == to_run_config(cfg)
    assert from_run_config(flat) == cfg


def test_pyproject_run_config_is_the_default_experiment_plus_server_keys():
    # Prepare
    toml = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    # Execute
    flat = flatten_dict(toml["tool"]["flwr"]["app"]["config"])
    cfg, run_dir, resume = read_run_config(flat)
    # Assert
    assert flat == {**to_run_config(load_config(None)), "run-dir": "", "resume": False}
    assert cfg == load_config(None) and run_dir == Path("runs/breastmnist-fedavg") and resume is False
    assert "federations" not in toml["tool"]["flwr"]  # flwr 1.42 would migrate and comment it out


def test_pyproject_components_name_the_apps():
    # Prepare
    components = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["components"]
    # Execute
    loaded = {}
    for role, reference in components.items():
        module, _, attribute = reference.partition(":")
        loaded[role] = getattr(importlib.import_module(module), attribute)
    # Assert
    assert isinstance(loaded["serverapp"], ServerApp)
    assert isinstance(loaded["clientapp"], ClientApp)


def test_a_scenario_named_in_flwr_runs_config_without_its_settings_is_refused():
    # `flwr run . --run-config 'federation.scenario="unseen-hospital"'` named a scenario that nothing
    # applied: 3 IID sites ran, labelled unseen-hospital.
    from medfed.config import ConfigError

    flat = flatten_dict(tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"])
    flat["federation.scenario"] = "unseen-hospital"
    with pytest.raises(ConfigError, match="'flwr run' does not apply a scenario"):
        read_run_config(flat)
    merged = load_config(None, ["federation.scenario=unseen-hospital"])
    assert from_run_config(to_run_config(merged)) == merged  # medfed's launchers send it merged
