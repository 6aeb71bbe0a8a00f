"""medfed evaluate: a model's test metrics under corruptions (tiny data, untrained nano model)."""

from __future__ import annotations

import json

import pytest
import torch

from medfed.cli import main
from medfed.config import load_config, save_config
from medfed.models import create_model
from medfed.server.checkpoint import save_arrays


def _save_model(folder, seed=0):
    torch.manual_seed(seed)
    model = create_model("medvit_v2_nano", num_classes=2, in_chans=1, img_size=28)
    folder.mkdir(parents=True, exist_ok=True)
    save_arrays(folder / "model.safetensors", {k: v.detach().numpy().copy() for k, v in model.state_dict().items()})


def test_evaluate_a_train_output_writes_table_json_and_figure(tiny_root, tmp_path, capsys):
    # Prepare: a medfed-train-like folder.
    _save_model(tmp_path / "train")
    (tmp_path / "train" / "metrics.json").write_text(json.dumps(
        {"config": {"dataset": "breastmnist", "model": "medvit_v2_nano", "img_size": 28}}))
    # Execute
    code = main(["evaluate", "--model", str(tmp_path / "train"), "--data-root", str(tiny_root),
                 "--corruptions", "gaussian_noise,pixelate", "--severities", "1,5"])
    # Assert
    assert code == 0
    result = json.loads((tmp_path / "train" / "robustness.json").read_text())
    assert (tmp_path / "train" / "robustness.png").read_bytes().startswith(b"\x89PNG")
    assert result["num_test"] == 12 and set(result["corruptions"]) == {"gaussian_noise", "pixelate"}
    levels = result["corruptions"]["pixelate"]["severities"]
    assert set(levels) == {"1", "5"}
    mean = result["corruptions"]["pixelate"]["mean"]["balanced_error"]
    assert mean == pytest.approx((levels["1"]["balanced_error"] + levels["5"]["balanced_error"]) / 2)
    assert 0.0 <= result["clean"]["balanced_error"] <= 1.0
    assert "pixelate" in capsys.readouterr().out


def test_evaluate_a_run_folder_uses_its_config(tiny_root, tmp_path):
    # Prepare: a run folder with its config and final model.
    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=[f"data.root={tiny_root}"]), run / "config.yaml")
    # Execute
    code = main(["evaluate", "--run", str(run), "--corruptions", "brightness_up", "--severities", "2"])
    # Assert
    assert code == 0 and "brightness_up" in json.loads((run / "robustness.json").read_text())["corruptions"]


@pytest.mark.parametrize("strategy", ["fedavg", "fedbn"])
def test_a_fedbn_run_is_evaluated_with_batchnorm_statistics_of_the_evaluation_data(tiny_root, tmp_path, capsys,
                                                                                   strategy):
    # Prepare: a FedBN run's global model holds the initial BatchNorm of no site.
    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=[f"data.root={tiny_root}", f"strategy.name={strategy}"]), run / "config.yaml")
    # Execute
    code = main(["evaluate", "--run", str(run), "--corruptions", "pixelate", "--severities", "1"])
    # Assert: the training split (24 tiny images) was read, for FedBN only.
    adapted = json.loads((run / "robustness.json").read_text())["adapted"]
    assert code == 0
    if strategy == "fedbn":
        assert adapted == "FedBN: BatchNorm statistics estimated from 24 training images (the site has none of its own)"
        assert adapted in capsys.readouterr().out
    else:
        assert adapted is None


@pytest.mark.parametrize("args", [["--corruptions", "nope"], ["--severities", "0,9"]])
def test_evaluate_bad_arguments_are_one_line_errors(tiny_root, tmp_path, capsys, args):
    run = tmp_path / "run"
    _save_model(run)
    save_config(load_config(overrides=[f"data.root={tiny_root}"]), run / "config.yaml")
    assert main(["evaluate", "--run", str(run), *args]) == 2
    assert capsys.readouterr().err.count("\n") == 1
